"""The Baseten emulator's serverless sampler: the Loops queue in front of a sampler server.

A serverless sampler (``model_id: null`` in its ``POST /v1/loops/samplers`` answer; made through
the debug route with ``scope: "serverless"`` or, for every sampler, with the ``serverless_samplers``
fault) answers its data plane the way the published client's queued path expects
(``sampling_client.sample_async``, ``promise_client._poll_operation_async``)::

    POST /sample                    202 {operation_id, schema_version: 1}; needs Idempotency-Key and
                                    body "model" (400 without); a repeated key answers the same id
    GET  /operations/{id}           200 {status: "done", result: <completions>} | {status: "error", ...};
                                    408 while queued or running (after a hold of up to ``hold_s``);
                                    404 for an unknown id
    POST /operations/{id}/cancel    200 while still queued (it never runs), 409 once running or done

The job itself is the sampler server's own ``POST /sample`` with the same body and headers (the
body's ``lora``, which the queue forwards to the engine, names the same checkpoint as the
``X-Checkpoint-Path`` header, which the sampler reads). Faults: ``queue_hold_s`` keeps new jobs
queued that long before they run; ``queue_busy=N`` answers the next N submits 503 with a
``Retry-After`` (the queue's brief overload, which the client waits out).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from starlette.responses import JSONResponse, Response

from .emulator_faults import error

if TYPE_CHECKING:  # pragma: no cover
    from .emulator_deployments import Deployment
    from .emulator_faults import Faults

FORWARDED = {"content-type", "x-checkpoint-path", "x-min-policy-version", "x-run-id", "x-sampler-id",
             "x-baseten-session-id", "user-agent"}


@dataclass
class QueuedSample:
    id: str
    state: str = "queued"                # queued | running | done | error | cancelled
    result: dict[str, Any] | None = None
    error: str | None = None
    error_class: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class SampleQueue:
    """One per serverless sampler deployment."""

    def __init__(self, dep: "Deployment", faults: "Faults", *, hold_s: float = 30.0):
        self.dep = dep
        self.faults = faults
        self.hold_s = hold_s
        self.jobs: dict[str, QueuedSample] = {}
        self.by_key: dict[str, str] = {}

    async def handle(self, method: str, sub: str, headers: dict[str, str], body: bytes,
                     query: dict[str, str]) -> Response:
        if method == "POST" and sub == "/sample":
            return await self.submit(headers, body)
        parts = sub.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == "operations":
            job = self.jobs.get(parts[1])
            if job is None:
                return error(404, f"unknown operation {parts[1]!r}")
            if method == "POST" and parts[2:] == ["cancel"]:
                return self.cancel(job)
            if method == "GET" and len(parts) == 2:
                return await self.poll(job, query)
        return error(404, f"the serverless sampler queue has no route {method} {sub}")

    async def submit(self, headers: dict[str, str], raw: bytes) -> Response:
        key = headers.get("idempotency-key")
        if not key:
            return error(400, "Idempotency-Key is required on every /sample submit")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return error(400, "model is required on a serverless /sample: name the base model")
        if body["model"] != self.dep.base_model:
            return error(404, f"model {body['model']!r} is not served here (this sampler serves "
                              f"{self.dep.base_model!r})")
        if key in self.by_key:
            return _accepted(self.by_key[key])
        if self.faults.take_queue_busy():
            return error(503, "the sampling queue is busy; retry after the pause", headers={"Retry-After": "1"})
        job = QueuedSample(id=f"sop-{uuid.uuid4().hex[:16]}")
        self.jobs[job.id] = job
        self.by_key[key] = job.id
        sent = {k: v for k, v in headers.items() if k in FORWARDED}
        job.task = asyncio.get_running_loop().create_task(self._run(job, sent, raw, float(self.faults.queue_hold_s)))
        return _accepted(job.id)

    async def _run(self, job: QueuedSample, headers: dict[str, str], raw: bytes, hold: float) -> None:
        try:
            if hold > 0:
                await asyncio.sleep(hold)
            if job.state == "cancelled":
                return
            job.state = "running"
            if self.dep.app is None:
                raise RuntimeError("the sampler is not provisioned")
            transport = httpx.ASGITransport(app=self.dep.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://sampler", timeout=600.0) as client:
                r = await client.post("/sample", content=raw, headers=headers)
            if r.status_code == 200:
                job.result, job.state = r.json(), "done"
            else:
                job.state, job.error_class = "error", f"HTTP{r.status_code}"
                job.error = f"the sampler answered {r.status_code}: {r.text[:500]}"
        except Exception as exc:  # noqa: BLE001 - reported to the poller
            job.state, job.error, job.error_class = "error", str(exc), type(exc).__name__
        finally:
            job.finished.set()

    async def poll(self, job: QueuedSample, query: dict[str, str]) -> Response:
        try:
            hold = min(float(query.get("timeout", self.hold_s)), self.hold_s)
        except ValueError:
            hold = self.hold_s
        if not job.finished.is_set():
            try:
                await asyncio.wait_for(job.finished.wait(), hold)
            except TimeoutError:
                return error(408, "the sample is still queued or running; poll again")
        if job.state == "done":
            return JSONResponse({"status": "done", "result": job.result})
        if job.state == "cancelled":
            return JSONResponse({"status": "error", "error": "the sample was cancelled", "error_class": "Cancelled"})
        return JSONResponse({"status": "error", "error": job.error, "error_class": job.error_class})

    def cancel(self, job: QueuedSample) -> Response:
        if job.state != "queued":
            return error(409, f"operation {job.id} is {job.state}; only a queued sample can be cancelled")
        job.state = "cancelled"
        job.finished.set()
        return JSONResponse({"operation_id": job.id, "status": "cancelled"})

    def close(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()


def _accepted(op_id: str) -> JSONResponse:
    return JSONResponse({"operation_id": op_id, "schema_version": 1}, status_code=202,
                        headers={"Location": f"/operations/{op_id}"})
