"""The runs a trainer server hosts: one LoRA adapter + optimizer each, on the server's one base model.

Each run orders its own operations; runs never wait on each other's sequence numbers. A run's
operations are queued per *client stream*: clients number their submissions 1, 2, 3, ... (``seq_id``),
and two clients on one run (the published client's ``reuse_from_run_id``, or two processes) count
independently. A submission continues the stream whose next number is its own; ``1`` starts a new
stream; any other number joins the stream whose count is nearest, whose queue then runs it in order
with the others (waiting at most its gap timer for a missing number). So two clients on a run never
stall each other, while one client's retried or reordered submissions still run in its order.
Every stream queue has its own runner; they all feed the server's single engine worker, first come
first served, so runs (and streams) take turns: a long queue of one run cannot starve another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .operations import Operation, OperationQueue

MAX_STREAMS = 8  # per run; the least recently used idle stream is dropped past this


@dataclass
class Stream:
    queue: OperationQueue
    next_seq: int | None = None  # the seq_id that continues this stream
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Run:
    id: str
    engine_key: str  # the engine's name for it (the server's default run is the engine's "default")
    lora_rank: int
    new_queue: Callable[[], OperationQueue]
    policy_version: int = 0
    step: int = 0
    closing: bool = False
    streams: list[Stream] = field(default_factory=list)

    def queue_for(self, seq_id: int | None) -> OperationQueue:
        """The queue a submission with ``seq_id`` joins (see the module docstring)."""
        now = time.monotonic()
        if seq_id is None:
            stream = self.streams[0] if self.streams else self._new_stream()
        else:
            stream = next((s for s in self.streams if s.next_seq == seq_id), None)
            if stream is None and seq_id != 1:
                counted = [(abs(s.next_seq - seq_id), i) for i, s in enumerate(self.streams) if s.next_seq is not None]
                stream = self.streams[min(counted)[1]] if counted else None
            if stream is None:
                stream = self._new_stream()
            stream.next_seq = max(stream.next_seq or 0, seq_id + 1)
        stream.last_used = now
        return stream.queue

    def _new_stream(self) -> Stream:
        idle = [s for s in self.streams if s.queue.depth == 0]
        if len(self.streams) >= MAX_STREAMS and idle:
            self.streams.remove(min(idle, key=lambda s: s.last_used))  # its results stay pollable
        stream = Stream(self.new_queue())
        self.streams.append(stream)
        return stream

    @property
    def queues(self) -> list[OperationQueue]:
        return [s.queue for s in self.streams]

    def find(self, key: str) -> Operation | None:
        for s in self.streams:
            op = s.queue.get(key)
            if op is not None:
                return op
        return None

    @property
    def depth(self) -> int:
        return sum(s.queue.depth for s in self.streams)

    def close(self) -> None:
        for s in self.streams:
            s.queue.close()
