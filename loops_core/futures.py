"""One background event loop, and futures that are both ``.result()``-able and awaitable.

All network work runs as coroutines on a single daemon-thread loop owned by the SDK (as in the
Tinker SDK). Sync methods submit a coroutine there and block on it; ``*_async`` methods await the
same coroutine from the caller's loop. An ``APIFuture`` wraps a ``concurrent.futures.Future``, so:

* ``future.result(timeout)`` blocks the calling thread; when the timeout expires it raises
  ``FutureTimeoutError`` and the future stays usable (the poll keeps running in the background), so a
  later ``.result()`` still returns the value;
* ``await future`` / ``await future.result_async(timeout)`` work from any event loop;
* ``future.future()`` is the ``concurrent.futures.Future``; ``future.coroutine()`` a coroutine.

Client methods are written once, as ``async def``, under ``@twin``: the decorator makes the blocking
method and its ``*_async`` form from that one definition (same signature, defaults and docstring),
so the two can never drift apart.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import os
import threading
from typing import Any, Awaitable, Callable, Coroutine, Generator, Generic, TypeVar

from .errors import FutureTimeoutError

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The SDK's event loop, started on first use in a daemon thread."""
    global _loop, _thread
    with _lock:
        if _loop is None or not _thread or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="loops-event-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


@atexit.register
def _stop_loop() -> None:
    # Cancel what is still pending (in-process servers' queue runners, polls) so the interpreter
    # exits without "Task was destroyed but it is pending" noise.
    loop = _loop
    if loop is None or not loop.is_running():
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(2.0)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)


def _reset_after_fork() -> None:
    # A forked child inherits a loop whose thread does not exist there; start afresh on demand.
    global _loop, _thread
    _loop, _thread = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _on_background_loop() -> bool:
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and block until it finishes."""
    if _on_background_loop():
        coro.close()
        raise RuntimeError("A blocking loops call was made on the SDK's own event loop; use the *_async method")
    return submit(coro).result(timeout)


class OperationFuture(Generic[T]):
    """The result of a long-running call: ``.result(timeout=None)``, ``await``, ``.done()``."""

    def __init__(self, inner: concurrent.futures.Future[T], *, operation_id: str | None = None):
        self._inner = inner
        self.operation_id = operation_id

    @classmethod
    def from_coroutine(cls, coro: Coroutine[Any, Any, T], *, operation_id: str | None = None) -> "OperationFuture[T]":
        return cls(submit(coro), operation_id=operation_id)

    def result(self, timeout: float | None = None) -> T:
        """Block until the operation finishes and return its value (or raise its error).

        ``timeout`` bounds this call only: when it expires, ``FutureTimeoutError`` is raised and the
        operation keeps running, so the future can be waited on again.
        """
        if _on_background_loop():
            raise RuntimeError("OperationFuture.result() was called on the SDK's event loop; use `await future`")
        try:
            return self._inner.result(timeout)
        except concurrent.futures.TimeoutError:
            raise FutureTimeoutError(
                f"The operation{' ' + self.operation_id if self.operation_id else ''} did not finish within "
                f"{timeout} s; it is still running — call .result() again to keep waiting") from None

    async def result_async(self, timeout: float | None = None) -> T:
        wrapped = asyncio.wrap_future(self._inner)
        try:
            # shield: a timeout here must not cancel the shared inner future
            return await asyncio.wait_for(asyncio.shield(wrapped), timeout)
        except asyncio.TimeoutError:
            raise FutureTimeoutError(
                f"The operation did not finish within {timeout} s; it is still running") from None

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._inner.done()

    def future(self) -> concurrent.futures.Future[T]:
        return self._inner

    def coroutine(self) -> Coroutine[Any, Any, T]:
        return self.result_async()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<{type(self).__name__} {self.operation_id or ''} {state}>"


# Tinker's name for the same thing.
APIFuture = OperationFuture


class ForwardBackwardFuture(OperationFuture[T]):
    """The future returned by ``forward`` and ``forward_backward``."""


async def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the SDK loop (where all network I/O lives), from any event loop."""
    if _on_background_loop():
        return await coro
    return await asyncio.wrap_future(submit(coro))


class twin:
    """Decorator: one ``async def`` client method becomes ``name`` (blocks the caller's thread) and
    ``name_async`` (awaitable from any event loop), both running the body on the SDK's loop.

    The two are made from the one definition with ``functools.wraps``: signatures, defaults,
    annotations and docstrings are identical by construction.
    """

    def __init__(self, fn: Callable[..., Awaitable[Any]]):
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        fn = self.fn

        @functools.wraps(fn)
        def blocking(self: Any, *args: Any, **kwargs: Any) -> Any:
            return run_sync(fn(self, *args, **kwargs))

        @functools.wraps(fn)
        async def awaitable(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await on_loop(fn(self, *args, **kwargs))

        awaitable.__name__ = f"{name}_async"
        awaitable.__qualname__ = f"{owner.__qualname__}.{name}_async"
        setattr(owner, name, blocking)
        setattr(owner, f"{name}_async", awaitable)


class ClientLifecycle:
    """``with`` / ``async with`` for a client that has ``close()`` and ``aclose()``."""

    def close(self) -> None:  # pragma: no cover - every client overrides
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - every client overrides
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self):  # noqa: ANN204
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
