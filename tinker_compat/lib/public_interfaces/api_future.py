"""Tinker's ``APIFuture``: loops' future, with loops errors raised as Tinker's.

Every shim method returns one at once: ``.result(timeout)``, ``await future``,
``.result_async(timeout)``, ``.future()`` (the ``concurrent.futures.Future``), ``.coroutine()``
and ``.done()`` all come from ``loops_core.APIFuture``, which this subclasses (so
``isinstance(f, loops_core.APIFuture)`` holds). The work runs on loops' background event loop; a
method's errors — bad input found by the client or the server, a failed operation — surface when
the future is waited on, as Tinker's exceptions (``_exceptions.tinker_errors``, the one place
where they are translated).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from loops_core.futures import APIFuture as _LoopsFuture

from ..._exceptions import tinker_errors

T = TypeVar("T")


class APIFuture(_LoopsFuture[T]):
    """A result that is still being computed: ``.result()`` in sync code, ``await`` in async code."""

    def result(self, timeout: float | None = None) -> T:
        with tinker_errors():
            return super().result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        with tinker_errors():
            return await super().result_async(timeout)

    async def coroutine(self) -> T:  # type: ignore[override]
        """The result as a coroutine (for ``asyncio.create_task`` / ``gather``)."""
        return await self.result_async()


async def settle(submitted: Awaitable[Any]) -> Any:
    """Await a loops ``*_async`` call that returns a future once submitted, then that future."""
    future = await submitted
    return await future


def run(cls: type[APIFuture], coro: Coroutine[Any, Any, Any]) -> Any:
    """``coro`` started on loops' event loop, as a ``cls`` future.

    Calls made one after another start in that order, so a TrainingClient's operations keep
    their submission order (loops reserves each operation's turn before its first await).
    """
    return cls.from_coroutine(coro)


def deprecated_async(sync: Callable[..., Any], *, returns_future: bool) -> Callable[..., Any]:
    """The deprecated ``<name>_async`` twin of ``sync``: warns (FutureWarning, as Tinker does) and
    returns what Tinker's twin returns: the future itself for training operations
    (``returns_future``), the finished value for the others."""

    @functools.wraps(sync)  # same signature as the sync method
    async def twin(self: Any, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"DEPRECATED: {type(self).__name__}.{sync.__name__}_async() is deprecated (as in tinker "
                      f"0.38); use `await client.{sync.__name__}(...)`, which returns an APIFuture",
                      FutureWarning, stacklevel=2)
        future = sync(self, *args, **kwargs)
        return future if returns_future else await future

    twin.__name__ = f"{sync.__name__}_async"
    twin.__qualname__ = f"{sync.__qualname__}_async"
    return twin
