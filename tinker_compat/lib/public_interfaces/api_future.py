"""Tinker's ``APIFuture`` over loops' future: ``result``, ``result_async``, ``coroutine``, ``future``, ``await``.

Every shim method returns one at once. The work runs on loops' background event loop (started by
``loops_core.APIFuture.from_coroutine``); its errors — bad input found by the client or the
server, a failed operation — surface when the future is waited on, as Tinker's exceptions
(``_exceptions.tinker_errors``, the one place where they are translated). It wraps, rather than
subclasses, loops' future so it offers only what Tinker's does.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import warnings
from typing import Any, Callable, Coroutine, Generator, Generic, TypeVar

from loops_core.futures import APIFuture as _LoopsFuture

from ..._exceptions import tinker_errors

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A result that is still being computed: ``.result()`` in sync code, ``await`` in async code."""

    _loops_future: _LoopsFuture[T]

    def result(self, timeout: float | None = None) -> T:
        with tinker_errors():
            return self._loops_future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        with tinker_errors():
            return await self._loops_future.result_async(timeout)

    async def coroutine(self) -> T:
        """The result as a coroutine (for ``asyncio.create_task`` / ``gather``)."""
        return await self.result_async()

    def future(self) -> concurrent.futures.Future[T]:
        """The ``concurrent.futures.Future`` underneath (its exception is loops', untranslated)."""
        return self._loops_future.future()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


def run(cls: type[APIFuture[Any]], coro: Coroutine[Any, Any, Any]) -> Any:
    """``coro`` started on loops' event loop, as a ``cls`` future.

    Calls made one after another start in that order, so a TrainingClient's operations keep
    their submission order (loops reserves each operation's turn before its first await).
    """
    future = cls.__new__(cls)
    future._loops_future = _LoopsFuture.from_coroutine(coro)
    return future


async def settle(submitted: Any) -> Any:
    """Await a loops ``*_async`` call that returns a future once submitted, then that future."""
    future = await submitted
    return await future


def deprecated_async(sync: Callable[..., Any], *, returns_future: bool) -> Callable[..., Any]:
    """The deprecated ``<name>_async`` twin of ``sync``: warns (FutureWarning, as Tinker does) and
    returns an awaitable of what Tinker's twin gives: the future itself for training operations
    (``returns_future``), the finished value for the others. A plain function, as in Tinker."""

    def twin(self: Any, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"DEPRECATED: {type(self).__name__}.{sync.__name__}_async() is deprecated (as in tinker "
                      f"0.38); use `await client.{sync.__name__}(...)`, which returns an APIFuture",
                      FutureWarning, stacklevel=2)
        future = sync(self, *args, **kwargs)

        async def finish() -> Any:
            return future if returns_future else await future

        return finish()

    twin.__name__ = f"{sync.__name__}_async"
    twin.__qualname__ = f"{sync.__qualname__}_async"
    twin.__doc__ = f"Deprecated twin of ``{sync.__name__}``."
    twin.__signature__ = inspect.signature(sync)  # type: ignore[attr-defined]
    return twin


def unsupported(what: str, reason: str) -> NotImplementedError:
    """The error a Tinker feature loops does not have raises when used."""
    return NotImplementedError(f"tinker (loops shim): {what} is not supported by loops: {reason}")


class AwaitableConcurrentFuture(Generic[T]):
    """A ``concurrent.futures.Future`` that can also be awaited (Tinker's building block for futures)."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        with tinker_errors():
            return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        import asyncio

        with tinker_errors():
            return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    async def coroutine(self) -> T:
        return await self.result_async()

    def future(self) -> concurrent.futures.Future[T]:
        return self._future

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()
