"""The HF sampler's work queue: work items, the worker thread, and how requests become batches.

Separate from ``sampler_hf.py`` (which owns the model and runs a batch's prefill and decode)
because this part is plain threading and scheduling with no torch in it: which queued rows make
the next batch, which may join a running one, when an adapter load or unload may run, and how a
result or an error reaches a caller's future on its own event loop.

Items on the queue are a list of ``Row`` (one request) or a ``Control`` (load, unload, stop); one
worker thread takes them off in order. Rows queued while a batch decodes join it
(``take_joiners``). A control item waits until every row queued before it has finished, and no
row queued after it joins a batch ahead of it. With ``strict_seeds`` a seeded request runs in a
batch of its own and nothing joins it (nor jumps over it in the queue).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loops_core.engine import GeneratedSequence, GenerationRequest

logger = logging.getLogger(__name__)

BURST_WINDOW_S = 0.05  # the longest a batch waits for the rest of a burst of requests


# --------------------------------------------------------------------------------------------
# Work items
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One ``generate`` call on its way through the worker."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    adapter: str
    seeds: list[int]
    sequences: list[GeneratedSequence | None]
    rows_left: int
    prompt_logprobs: list[float | None] | None = None
    prompt_topk: list[list[tuple[int, float]] | None] | None = None
    target_prompt_logprobs: list[list[float]] | None = None
    cancelled: bool = False
    failed: bool = False


@dataclass
class Row:
    """One sequence of a job (or, for ``max_tokens == 0``, just its prompt-logprob pass)."""

    job: Job
    index: int  # which of the job's n sequences; -1 for a prompt-logprob-only row
    want_prompt_lp: bool
    max_new: int
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    topk: int = 0  # top-k (id, logprob) wanted per sampled token
    generator: Any = None  # torch.Generator, created in the worker
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topks: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    done: bool = False


@dataclass
class Control:
    kind: str  # "load" | "unload" | "stop"
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future | None
    version: int = 0
    path: str = ""


def new_job(req: GenerationRequest, prompt: list[int], loop: asyncio.AbstractEventLoop, *,
            max_new: int, adapter: str, greedy: bool) -> tuple[Job, list[Row]]:
    """The job of one checked ``generate`` request (``prompt`` its checked tokens, ``max_new``
    capped to the context) and its rows: one per sample, or a single prompt-logprob-only row
    when there is nothing to decode."""
    n = int(req.n)
    want_plp = wants_prompt_pass(req)
    base_seed = req.seed if req.seed is not None else secrets.randbits(63)
    job_req = copy.copy(req)  # (copied, not rebuilt: it may carry fields newer than this module)
    job_req.prompt = prompt
    job = Job(req=job_req, loop=loop,
              future=loop.create_future(), adapter=adapter,
              seeds=[(int(base_seed) + i) % (1 << 64) for i in range(n)],
              sequences=[None] * n, rows_left=0)
    rows: list[Row] = []
    if n == 0 or max_new <= 0:
        rows.append(Row(job=job, index=-1, want_prompt_lp=True, max_new=0, greedy=True,
                        temperature=1.0, top_k=-1, top_p=1.0))
        job.sequences = [GeneratedSequence(tokens=[], logprobs=[], finish_reason="length")
                         for _ in range(n)]
    else:
        for i in range(n):
            rows.append(Row(job=job, index=i, want_prompt_lp=want_plp and i == 0,
                            max_new=max_new, greedy=greedy,
                            temperature=1.0 if greedy else float(req.temperature),
                            top_k=int(req.top_k), top_p=float(req.top_p),
                            topk=int(getattr(req, "topk_sample_logprobs", 0) or 0)))
    job.rows_left = len(rows)
    return job, rows


def wants_prompt_pass(req: GenerationRequest) -> bool:
    """Whether the prompt's logits are needed: prompt logprobs, or target prompt tokens."""
    return req.prompt_logprobs is not None or getattr(req, "target_prompt_tokens", None) is not None


def resolve(loop, fut, result=None, exc: BaseException | None = None) -> None:
    """Set ``fut`` (which belongs to ``loop``) from the worker thread: futures are not thread-safe,
    so the setting is scheduled on the future's own loop."""

    def set_it():
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(set_it)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


# --------------------------------------------------------------------------------------------
# The queue and its worker
# --------------------------------------------------------------------------------------------


class BatchQueue:
    """The engine's queue and worker thread (started here). All model work is the engine's:
    the worker calls ``engine._run_batch(rows)``, ``engine._do_load(version, path)`` and
    ``engine._do_unload(version)``. ``max_batch_size``, ``batch_wait_s`` and ``strict_seeds`` are
    read from the engine whenever they are needed, so they stay its own public attributes."""

    def __init__(self, engine, thread_name: str) -> None:
        self._engine = engine
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque[Row] = deque()  # rows taken off the queue, not yet in a batch
        self._ctl: Control | None = None  # a control item waiting for the rows ahead of it
        self.dead: BaseException | None = None  # what killed the worker, if it died
        self._thread = threading.Thread(target=self._worker, name=thread_name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the event loop's side

    def submit(self, rows: list[Row]) -> None:
        """Queue the rows of one request (its job's future gets the result)."""
        self._queue.put(rows)

    async def control(self, kind: str, version: int, path: str = "") -> None:
        """Run an adapter load or unload once everything queued before it has finished."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(Control(kind, loop, fut, version, path))
        await fut

    async def stop(self) -> None:
        """Finish everything queued, then end the worker thread."""
        if self._thread.is_alive():
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._queue.put(Control("stop", loop, fut))
            await fut
            await asyncio.to_thread(self._thread.join)

    # ---------------------------------------------------------------- the worker's side

    def isolated(self, job: Job) -> bool:
        """Whether ``job`` must run in a batch of its own (``strict_seeds``)."""
        return self._engine.strict_seeds and job.req.seed is not None

    def _worker(self) -> None:
        try:
            self._worker_loop()
        except BaseException as e:  # pragma: no cover - a bug; fail whoever still waits
            logger.exception("HF sampler worker died")
            self.dead = e
            for r in self._pending:
                resolve(r.job.loop, r.job.future, exc=e)
            self._pending.clear()
            if self._ctl is not None and self._ctl.loop is not None:
                resolve(self._ctl.loop, self._ctl.future, exc=e)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Control):
                    if item.loop is not None:
                        resolve(item.loop, item.future, exc=e)
                else:
                    for r in item:
                        resolve(r.job.loop, r.job.future, exc=e)

    def _worker_loop(self) -> None:
        eng = self._engine
        pending = self._pending
        while True:
            if not pending:
                if self._ctl is not None:
                    control, self._ctl = self._ctl, None
                    self._run_control(control)
                    if control.kind == "stop":
                        return
                    continue
                item = self._queue.get()
                if isinstance(item, Control):
                    self._ctl = item
                    continue
                pending.extend(item)
            # Gather more work until the batch is full or no request came for batch_wait_s. The
            # window slides while requests keep arriving (a burst of concurrent HTTP requests
            # spreads over tens of ms), bounded so a steady trickle cannot hold a batch back.
            # Requests arriving later join the running batch between decode steps (_join).
            start = time.monotonic()
            deadline = start + eng.batch_wait_s
            while self._ctl is None and len(pending) < eng.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Control):
                    self._ctl = item  # runs once everything queued before it is done
                    break
                pending.extend(item)
                deadline = min(time.monotonic() + eng.batch_wait_s, start + BURST_WINDOW_S)
            batch = self._take_batch(pending)
            if not batch:
                continue
            try:
                eng._run_batch(batch)  # appends the rows that joined it to ``batch``
            except BaseException as e:  # noqa: BLE001 - report to every caller of the batch
                logger.exception("HF sampler batch failed")
                for job in {id(r.job): r.job for r in batch}.values():
                    job.failed = True
                    resolve(job.loop, job.future, exc=e)

    def _take_batch(self, pending: deque) -> list[Row]:
        """The next batch from ``pending`` (in order); with ``strict_seeds`` a seeded request's
        rows make a batch of their own."""
        max_batch_size = self._engine.max_batch_size
        while pending and (pending[0].job.cancelled or pending[0].job.failed):
            pending.popleft()
        batch: list[Row] = []
        if not pending:
            return batch
        if self.isolated(pending[0].job):
            job = pending[0].job
            while pending and pending[0].job is job and len(batch) < max_batch_size:
                batch.append(pending.popleft())
            return batch
        skipped: list[Row] = []
        while pending and len(batch) < max_batch_size:
            row = pending.popleft()
            if row.job.cancelled or row.job.failed:
                continue
            (skipped if self.isolated(row.job) else batch).append(row)
        pending.extendleft(reversed(skipped))
        return batch

    def take_joiners(self, room: int) -> list[Row]:
        """Up to ``room`` rows queued since the running batch started, to join it: those ahead
        of the first control item and of the first ``strict_seeds``-isolated request (which
        would otherwise wait for as long as newer requests keep joining)."""
        pending = self._pending
        while self._ctl is None:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Control):
                self._ctl = item  # runs once everything queued before it is done
            else:
                pending.extend(item)
        rows: list[Row] = []
        while pending and len(rows) < room:
            row = pending[0]
            if row.job.cancelled or row.job.failed:
                pending.popleft()
                continue
            if self.isolated(row.job):
                break
            rows.append(pending.popleft())
        return rows

    def _run_control(self, c: Control) -> None:
        try:
            if c.kind == "load":
                self._engine._do_load(c.version, c.path)
            elif c.kind == "unload":
                self._engine._do_unload(c.version)
            result, exc = None, None
        except BaseException as e:  # noqa: BLE001
            result, exc = None, e
        if c.loop is not None and c.future is not None:
            resolve(c.loop, c.future, result, exc)
