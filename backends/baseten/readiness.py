"""Waiting for Baseten deployments, and keeping a trainer awake.

* **Trainer readiness**: poll the trainer's ``/health?base_model=`` and, for a dedicated trainer,
  ``GET /v1/loops/deployments/{id}``; FAILED, STOPPED and PREEMPTED end the wait at once.
* **Sampler readiness** (dedicated samplers): poll the model deployment's status; SCALED_TO_ZERO
  gets one ``/wake``; ACTIVE is ready; the terminal states end the wait. A 4xx on the status route
  (a key without read rights) turns the gate off with a warning instead of failing.
* **Heartbeat**: an asyncio task on the SDK loop calls ``/health`` every 60 s so an idle trainer
  is not scaled down. 4xx answers are ignored; the 5th consecutive failure logs a warning and the
  20th stops the heartbeat.

The waits use ``loops_core.retry``: the trainer's health probe is retried under ``READINESS``
(connection errors, 404 and 5xx until ``ready_timeout``; its waits start at 0.5 s and back off to
10 s), the sampler's status is polled every ``SAMPLER_POLL_S`` with ``poll_until``. ``ready_poll_s``
fixes both intervals (for tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from loops_core.errors import APIError, APIStatusError, APITimeoutError, AuthenticationError, InvalidRequestError
from loops_core.retry import READINESS, RetryPolicy, poll_until
from loops_core.wire import WireClient

from .control_plane import ControlPlane, DeploymentFailedError
from .models import SAMPLER_READY, SAMPLER_TERMINAL, SCALED_TO_ZERO, TRAINER_TERMINAL, RunRecord, SamplerRecord

log = logging.getLogger("loops.baseten")

HEARTBEAT_S = 60.0
WARN_AFTER = 5
GIVE_UP_AFTER = 20
SAMPLER_POLL_S = 2.0  # a sampler status answer is definite each time: polled at a fixed interval


def readiness_policy(poll_s: float | None) -> RetryPolicy:
    """``READINESS``, or the same statuses at a fixed ``poll_s`` interval."""
    return READINESS if poll_s is None else dataclasses.replace(READINESS, initial=poll_s, max_wait=poll_s)


def trainer_terminal_error(status: str, run: RunRecord) -> DeploymentFailedError:
    dep = run.deployment_id
    if status == "PREEMPTED":
        msg = (f"the trainer for run {run.id} (deployment {dep}) was preempted: spot capacity was reclaimed. "
               "Create the training client again, or use availability_model='dedicated' to avoid preemption.")
    elif status == "STOPPED":
        msg = f"the trainer for run {run.id} (deployment {dep}) was stopped before it became ready."
    else:
        msg = (f"the trainer deployment {dep} for run {run.id} failed (status {status}); "
               "see the deployment's logs in the Baseten dashboard.")
    return DeploymentFailedError(msg, deployment_id=dep, status=status)


async def wait_for_trainer(cp: ControlPlane, run: RunRecord, probe: WireClient, base_model: str, *,
                           ready_timeout: float, poll_s: float | None = None) -> None:
    """Return once the trainer answers ``/health`` (``probe`` is a client on its endpoint)."""
    policy = readiness_policy(poll_s)
    status = None

    async def healthy() -> None:
        nonlocal status
        if run.deployment_id:
            status = await cp.trainer_status(run.deployment_id)
            if status in TRAINER_TERMINAL:
                raise trainer_terminal_error(status, run)
        try:
            await probe.request("GET", "/health", what="trainer health", params={"base_model": base_model},
                                retry=False, timeout=10.0)
        except AuthenticationError:
            raise AuthenticationError(f"the trainer for run {run.id} rejected the API key; check "
                                      "BASETEN_API_KEY") from None

    try:
        async for attempt in policy.retrying(ready_timeout):
            with attempt:
                return await healthy()
    except APIError as exc:
        if not policy.transient(exc):
            raise  # a definite answer (a terminal deployment, a rejected request): waiting will not change it
        raise APITimeoutError(f"the trainer for run {run.id} was not ready within {ready_timeout:.0f} s "
                              f"(deployment status {status or 'unknown'}; last health answer: "
                              f"{cp.scrub(str(exc))})") from None


async def wait_for_sampler(cp: ControlPlane, sampler: SamplerRecord, *, ready_timeout: float,
                           poll_s: float | None = None) -> None:
    if not sampler.dedicated:
        return  # serverless: nothing to watch
    assert sampler.model_id and sampler.deployment_id
    model_id, deployment_id = sampler.model_id, sampler.deployment_id
    woke = False
    status = None

    async def ready() -> bool:
        nonlocal woke, status
        try:
            status = await cp.sampler_status(model_id, deployment_id)
        except (AuthenticationError, InvalidRequestError) as exc:
            log.warning("cannot read the status of sampler %s (%s); not waiting for it", sampler.id, exc)
            return True
        except APIStatusError as exc:
            if 400 <= exc.status_code < 500:
                log.warning("cannot read the status of sampler %s (%s); not waiting for it", sampler.id, exc)
                return True
            raise
        if status == SAMPLER_READY:
            return True
        if status in SAMPLER_TERMINAL:
            raise DeploymentFailedError(
                f"the sampler {sampler.id} (deployment {deployment_id}) is {status}: it cannot serve. "
                "Create the sampling client again; if it persists, see the deployment in the Baseten dashboard.",
                deployment_id=deployment_id, status=status)
        if status == SCALED_TO_ZERO and not woke:
            assert sampler.base_url
            await cp.wake(sampler.base_url)
            woke = True
            log.info("sampler %s was scaled to zero; woke it", sampler.id)
        return False

    await poll_until(ready, budget=ready_timeout, interval=SAMPLER_POLL_S if poll_s is None else poll_s,
                     what=f"sampler {sampler.id} ready",
                     error=lambda _: APITimeoutError(f"the sampler {sampler.id} was not ready within "
                                                     f"{ready_timeout:.0f} s (status {status})"))


class Heartbeat:
    """Keeps one trainer awake; start and stop it on the SDK loop."""

    def __init__(self, wire: WireClient, *, base_model: str, run_id: str, interval: float = HEARTBEAT_S):
        self.run_id = run_id
        self.base_model = base_model
        self.interval = interval
        self.failures = 0
        self.beats = 0
        self.gave_up = False
        self._wire = wire  # owned: closed by stop()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"loops-heartbeat-{self.run_id}")

    async def _run(self) -> None:
        while await self._sleep_then_beat():
            pass

    async def _sleep_then_beat(self) -> bool:
        await asyncio.sleep(self.interval)
        return await self.beat()

    async def beat(self) -> bool:
        """One heartbeat; False once it has given up."""
        try:
            await self._wire.request("GET", "/health", what="heartbeat", params={"base_model": self.base_model},
                                     retry=False, timeout=30.0)
        except (AuthenticationError, InvalidRequestError):
            return True  # 4xx: ignored, as the published client does
        except APIStatusError as exc:
            if 400 <= exc.status_code < 500:
                return True
            return self._failed(exc)
        except APIError as exc:  # 503, connection errors, timeouts
            return self._failed(exc)
        self.failures = 0
        self.beats += 1
        return True

    def _failed(self, exc: Exception) -> bool:
        self.failures += 1
        if self.failures == WARN_AFTER:
            log.warning("heartbeat for run %s: %d consecutive failures (last: %s)", self.run_id, self.failures,
                        type(exc).__name__)
        if self.failures >= GIVE_UP_AFTER:
            log.error("heartbeat for run %s: giving up after %d consecutive failures; the trainer may scale "
                      "down when idle", self.run_id, self.failures)
            self.gave_up = True
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self._wire.aclose()
