"""The trainer's operation queue: submit → operation id, execute in order, long-poll the result.

* **Idempotency.** An operation's id is its ``Idempotency-Key`` when given. Resubmitting a known key
  returns the same id and runs nothing again.
* **Order.** Operations run one at a time. Those carrying ``seq_id`` run in ``seq_id`` order: if
  seq 7 arrives before seq 6, it waits for 6 (at most ``gap_wait`` seconds, in case 6 was never
  sent). A ``seq_id`` at or below the last one run means a new client started counting again.
* **Results** are kept ``ttl`` seconds after they finish, and while all kept results together take
  less than ``max_bytes`` (their JSON size); past that the oldest finished are dropped first. A
  poll of a dropped result gets 404, which clients read as "unknown operation: resubmit".
* **Shutdown.** ``shutdown()`` fails every queued operation with ``ServerShutdownError`` (a poll of
  one answers 503) and runs nothing more; the running operation finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

OpFn = Callable[[], Awaitable[Any]]
SHUTDOWN = "ServerShutdownError"
log = logging.getLogger("loops.server")


@dataclass
class Operation:
    id: str
    name: str
    seq_id: int | None
    fn: OpFn | None
    arrival: int
    submitted_at: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None
    error: str | None = None
    error_class: str | None = None
    finished_at: float | None = None
    size: int = 0  # bytes of the kept result, as JSON

    @property
    def http_status(self) -> int:
        """200 for a finished operation; 503 for one the shutdown failed (clients raise ServerShutdownError)."""
        return 503 if self.error_class == SHUTDOWN else 200

    def payload(self) -> dict[str, Any]:
        if self.error is not None:
            out = {"status": "error", "operation_id": self.id, "error": self.error,
                   "error_class": self.error_class, "schema_version": 1}
            if self.error_class == SHUTDOWN:  # also readable as an error body (detail / details.reason)
                out.update(detail=self.error, details={"reason": "SHUTTING_DOWN"})
            return out
        return {"status": "done", "operation_id": self.id, "result": self.result, "schema_version": 1}


class OperationQueue:
    def __init__(self, *, ttl: float = 3600.0, gap_wait: float = 5.0, max_bytes: int | None = None):
        from .requests import Limits

        self.ttl = ttl
        self.gap_wait = gap_wait
        self.max_bytes = Limits.from_env().max_result_bytes if max_bytes is None else max_bytes
        self.kept_bytes = 0
        self.closing = False
        self._ops: dict[str, Operation] = {}
        self._pending: list[Operation] = []
        self._arrivals = itertools.count()
        self._last_seq: int | None = None
        self._void: set[int] = set()  # seq ids the server refused: nothing will ever run under them
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.running: Operation | None = None

    def submit(self, name: str, fn: OpFn, *, key: str | None, seq_id: int | None) -> tuple[Operation, bool]:
        """Queue ``fn``; returns (operation, created). Must be called on the server's loop."""
        self._evict()
        if key and key in self._ops:
            return self._ops[key], False
        if self.closing:
            raise RuntimeError("the server is shutting down")  # the guard answers 503 before this
        op = Operation(id=key or uuid.uuid4().hex, name=name, seq_id=seq_id, fn=fn, arrival=next(self._arrivals))
        self._ops[op.id] = op
        self._pending.append(op)
        self._ensure_runner()
        assert self._wake is not None
        self._wake.set()
        return op, True

    def refuse(self, seq_id: int | None) -> None:
        """Record that the submission with ``seq_id`` was rejected, so later ones need not wait for it."""
        if seq_id is not None:
            self._void.add(seq_id)
            if self._wake is not None:
                self._wake.set()

    def get(self, op_id: str) -> Operation | None:
        self._evict()
        return self._ops.get(op_id)

    async def wait(self, op: Operation, hold: float) -> bool:
        """Wait up to ``hold`` seconds for ``op``; True when it is done."""
        try:
            await asyncio.wait_for(op.done.wait(), hold)
        except asyncio.TimeoutError:
            pass
        return op.done.is_set()

    @property
    def depth(self) -> int:
        return len(self._pending) + (1 if self.running else 0)

    # ---- execution ----------------------------------------------------------------------
    def _ensure_runner(self) -> None:
        # Created lazily on the loop that serves requests (uvicorn's, or the SDK's for in-process apps).
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())

    def _pick(self) -> tuple[Operation | None, float]:
        """The next operation to run, or (None, seconds to wait for a missing seq_id)."""
        unordered = [o for o in self._pending if o.seq_id is None]
        if unordered:
            return min(unordered, key=lambda o: o.arrival), 0.0
        op = min(self._pending, key=lambda o: (o.seq_id, o.arrival))
        expected = None if self._last_seq is None else self._last_seq + 1
        while expected is not None and expected in self._void:
            self._void.discard(expected)
            expected += 1
        if expected is None or op.seq_id <= expected or op.seq_id == 1:  # type: ignore[operator]
            return op, 0.0
        waited = time.monotonic() - op.submitted_at
        if waited >= self.gap_wait:
            return op, 0.0
        return None, self.gap_wait - waited

    async def _run(self) -> None:
        assert self._wake is not None
        while not self.closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            op, delay = self._pick()
            if op is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            self._pending.remove(op)
            if op.seq_id is not None:
                self._last_seq = op.seq_id
            self.running = op
            try:
                assert op.fn is not None
                op.result = await op.fn()
            except Exception as exc:  # the op failed; the server keeps serving
                op.error = str(exc) or type(exc).__name__
                op.error_class = type(exc).__name__
                if not getattr(exc, "expected", False):
                    traceback.print_exc()
            finally:
                self._finish(op)
                self.running = None

    def _finish(self, op: Operation) -> None:
        op.fn = None
        op.finished_at = time.monotonic()
        op.size = json_size(op.result) + len(op.error or "") + 200
        self.kept_bytes += op.size
        op.done.set()
        self._evict()

    def shutdown(self) -> list[str]:
        """Fail every queued operation with ServerShutdownError and run nothing more.

        Returns the ids of the operations whose clients are still owed an answer (queued and running)."""
        self.closing = True
        owed = [op.id for op in self._pending] + ([self.running.id] if self.running else [])
        pending, self._pending = self._pending, []
        for op in pending:
            op.error = "the server is shutting down; this operation never ran: submit it again elsewhere"
            op.error_class = SHUTDOWN
            self._finish(op)
        if pending:
            log.warning("shutdown: %d queued operation(s) failed with %s", len(pending), SHUTDOWN)
        if self._wake is not None:
            self._wake.set()
        return owed

    def close(self) -> None:
        """Stop the runner (callable from any thread). Pending operations are abandoned."""
        runner = self._runner
        if runner is not None and not runner.done():
            runner.get_loop().call_soon_threadsafe(runner.cancel)

    def _evict(self) -> None:
        now = time.monotonic()
        for k in [k for k, o in self._ops.items() if o.finished_at and now - o.finished_at > self.ttl]:
            self.kept_bytes -= self._ops.pop(k).size
        if self.kept_bytes > self.max_bytes:  # oldest finished first (dicts keep submission order)
            for k in [k for k, o in self._ops.items() if o.finished_at]:
                self.kept_bytes -= self._ops.pop(k).size
                if self.kept_bytes <= self.max_bytes:
                    break


def json_size(obj: Any) -> int:
    """About how many bytes ``obj`` takes as JSON, without serialising it (results can be megabytes:
    this runs on the event loop). A list of numbers counts 20 bytes an element."""
    if isinstance(obj, dict):
        return sum(len(str(k)) + 4 + json_size(v) for k, v in obj.items()) + 2
    if isinstance(obj, list):
        if obj and type(obj[0]) in (int, float):
            return 20 * len(obj) + 2
        return sum(json_size(x) + 1 for x in obj) + 2
    if isinstance(obj, str):
        return len(obj) + 2
    return 8
