"""Tinker's futures: a submit route answers ``{"request_id": ...}`` at once, ``/retrieve_future``
long-polls for the result.

A result is a JSON-able dict, or ``Proto(bytes)`` for the types the SDK reads as protobuf. A pending
future answers ``{"type": "try_again", ...}`` after a long-poll window shorter than the SDK's 45 s
read timeout; a failed one answers ``{"error": ..., "category": "user" | "server"}``, which the SDK
raises as ``RequestFailedError`` with that category. Finished results stay retrievable for a while
(the SDK may poll again after a lost response) and are then dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable

from ..errors import InvalidRequestError, NotFoundError, RemoteOpError

LONG_POLL_S = 20.0
KEEP_DONE_S = 15 * 60.0


@dataclass
class Proto:
    """A result the SDK reads as protobuf (forward/backward, sample); ``json`` for JSON-only callers."""

    data: bytes
    json: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    task: asyncio.Task
    kind: str
    done_at: float | None = None


def error_category(exc: BaseException) -> str:
    """``user`` for what the caller can fix (bad input, missing checkpoint), else ``server``."""
    if isinstance(exc, RemoteOpError):
        return "user" if (exc.error_class or "").endswith(("InvalidRequestError", "ValueError")) else "server"
    return "user" if isinstance(exc, (InvalidRequestError, NotFoundError, ValueError)) else "server"


class FutureStore:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]

    def submit(self, kind: str, work: Awaitable[Any]) -> str:
        """Start ``work`` now; its id is what the SDK polls."""
        self._evict()
        request_id = f"{self._prefix}-{next(self._ids)}"
        task = asyncio.ensure_future(work)
        entry = _Entry(task=task, kind=kind)
        task.add_done_callback(lambda _t: setattr(entry, "done_at", time.monotonic()))
        self._entries[request_id] = entry
        return request_id

    def cancel(self, request_id: str) -> None:
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.task.cancel()

    async def retrieve(self, request_id: str, *, wait_s: float = LONG_POLL_S) -> tuple[str, Any]:
        """``("pending", None)``, ``("done", result)`` or ``("failed", {"error", "category"})``."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise NotFoundError(f"no request {request_id!r} on this server (unknown, or finished more than "
                                f"{KEEP_DONE_S / 60:.0f} minutes ago)", status_code=404)
        if not entry.task.done():
            await asyncio.wait([entry.task], timeout=wait_s)
        if not entry.task.done():
            return "pending", None
        if entry.task.cancelled():
            return "failed", {"error": "the request was cancelled", "category": "user"}
        exc = entry.task.exception()
        if exc is not None:
            return "failed", {"error": f"{type(exc).__name__}: {exc}", "category": error_category(exc)}
        return "done", entry.task.result()

    def _evict(self) -> None:
        now = time.monotonic()
        stale = [k for k, e in self._entries.items() if e.done_at is not None and now - e.done_at > KEEP_DONE_S]
        for k in stale:
            del self._entries[k]
