"""Retry policies: one per plane, each written once, all built on tenacity.

Which HTTP statuses are worth another try, and why:

==============  ===========================================================================
policy          retried
==============  ===========================================================================
data_submit     connection errors; 408 (the server asks to come back: a cold start, or a
                version gate not yet met); 502 and 504 (a proxy lost the upstream). Safe to
                repeat: every submit carries one ``Idempotency-Key`` across its retries.
                Not 503: loops' servers answer 503 only while shutting down, for good.
sample          as data_submit, plus 503 and 429: a sampler replica being replaced or busy
                (the published client retries these too); a sample has no side effects.
                Unlike the published client, not 400/404: loops' samplers answer those for
                a bad request or an unknown checkpoint, which a retry cannot fix.
sample_queued   a serverless sampler's queue: 408, 502 and 504, and 503 after its
                ``Retry-After``; the key makes the queue run the generation at most once.
data_poll       connection errors and 502/504, but only for ``unreachable_timeout`` (default
                30 s): a poll that cannot reach its server for that long means the server
                is gone, and waiting longer would hang the caller.
control_plane   connection errors; 429 (rate limit, honouring ``Retry-After``); 502/503/504.
readiness       anything but a definite answer: connection errors, 404 (route not mounted
                yet during a cold start) and every 5xx, until ``ready_timeout``.
==============  ===========================================================================

Never retried anywhere: 400/422 (the request is wrong: ``InvalidRequestError``), 401/403, 409.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import tenacity

from .errors import APIConnectionError, LoopsError, ServerGoneError, ServerRestartedError

@dataclass(frozen=True)
class RetryPolicy:
    name: str
    statuses: frozenset[int]
    initial: float = 0.05  # first wait, seconds; doubles with jitter up to max_wait
    max_wait: float = 10.0
    # Steady-state calls give up on a server unreachable for ``unreachable_timeout``; waiting for
    # a server to come up (readiness) may take the whole provisioning budget.
    provisioning: bool = False

    def transient(self, exc: BaseException) -> bool:
        if isinstance(exc, (ServerRestartedError, ServerGoneError)):
            return False  # not transient: the server lost this client's state, or its process exited
        if isinstance(exc, APIConnectionError):
            return True
        return isinstance(exc, LoopsError) and getattr(exc, "status_code", None) in self.statuses

    def retrying(self, budget: float, *, unreachable: float | None = None) -> tenacity.AsyncRetrying:
        """Attempts until ``budget`` seconds have passed; an unbroken run of connection errors
        longer than ``unreachable`` seconds stops earlier."""
        deadline = _Deadline(budget, unreachable)
        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(self.transient),
            stop=deadline,
            wait=_RetryAfter(tenacity.wait_exponential_jitter(multiplier=self.initial, max=self.max_wait), deadline),
            reraise=True)


DATA_SUBMIT = RetryPolicy("data_submit", frozenset({408, 502, 504}))
SAMPLE = RetryPolicy("sample", frozenset({408, 429, 502, 503, 504}))
SAMPLE_QUEUED = RetryPolicy("sample_queued", frozenset({408, 502, 503, 504}))
DATA_POLL = RetryPolicy("data_poll", frozenset({502, 504}), initial=0.5, max_wait=2.0)
CONTROL_PLANE = RetryPolicy("control_plane", frozenset({429, 502, 503, 504}), initial=0.5, max_wait=8.0)
READINESS = RetryPolicy("readiness", frozenset({404, 408, 429, *range(500, 600)}), initial=0.5, max_wait=10.0,
                        provisioning=True)


class _Deadline(tenacity.stop.stop_base):
    def __init__(self, budget: float, unreachable: float | None):
        self.budget = budget
        self.unreachable = unreachable
        self._down_since: float | None = None

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        return self.remaining(state) <= 0

    def remaining(self, state: tenacity.RetryCallState) -> float:
        """Seconds left before giving up: the budget, or the unreachable window once the server stopped answering."""
        left = self.budget - (state.seconds_since_start or 0.0)
        exc = state.outcome.exception() if state.outcome is not None else None
        if not isinstance(exc, APIConnectionError):
            self._down_since = None
            return left
        now = time.monotonic()
        self._down_since = self._down_since or now
        if self.unreachable is None:
            return left
        return min(left, self.unreachable - (now - self._down_since))


class _RetryAfter(tenacity.wait.wait_base):
    """The server's ``Retry-After`` (carried on the error as ``retry_after``) when it gives one, else
    the backoff; never past the deadline, so a give-up is on time."""

    def __init__(self, fallback: tenacity.wait.wait_base, deadline: _Deadline):
        self.fallback = fallback
        self.deadline = deadline

    def __call__(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        hinted = getattr(exc, "retry_after", None)
        wait = min(float(hinted), 60.0) if hinted else self.fallback(state)
        return max(0.0, min(wait, self.deadline.remaining(state)))


async def poll_until(check: Callable[[], Awaitable[bool]], *, budget: float, interval: float, what: str,
                     error: Callable[[str], BaseException]) -> None:
    """Call ``check`` every ``interval`` seconds until it returns True; ``error`` past ``budget``."""
    retrying = tenacity.AsyncRetrying(retry=tenacity.retry_if_result(lambda ok: not ok),
                                      stop=tenacity.stop_after_delay(budget), wait=tenacity.wait_fixed(interval))
    try:
        async for attempt in retrying:
            with attempt:
                ok = await check()
            if not attempt.retry_state.outcome.failed:
                attempt.retry_state.set_result(ok)
    except tenacity.RetryError:
        raise error(f"{what} did not happen within {budget:.0f} s") from None


def retry_after_seconds(value: Any) -> float | None:
    """A ``Retry-After`` header in seconds (the HTTP-date form is rare here and ignored)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None
