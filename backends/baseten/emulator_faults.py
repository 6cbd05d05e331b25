"""Fault injection for the Baseten emulator, and its error answers.

Set faults with ``Emulator(faults=Faults(...))``, ``emulator.faults.update(...)`` or
``POST /_emulator/faults`` with the same fields as JSON. They apply to what is created or called
*after* they are set:

* ``provisioning_polls=N``: new deployments report BUILDING, then DEPLOYING, for N status polls
  (the gateway answers 502 meanwhile);
* ``scaled_to_zero=True``: new samplers report SCALED_TO_ZERO until ``POST .../wake``;
* ``fail_trainers="FAILED"`` (or ``PREEMPTED``, ``STOPPED``): new trainer deployments end there;
* ``fail_samplers="DEPLOY_FAILED"`` (or another sampler terminal state): likewise for samplers;
* ``burst_count=N, burst_status=502``: the next N control-plane calls answer that status;
* ``short_files=True``: presigned downloads lose their last byte (a truncated transfer);
* ``serverless_samplers=True``: new samplers are serverless (``model_id: null``; the Loops queue
  in front, see ``emulator_serverless``), as the debug route's ``scope: "serverless"`` makes one;
* ``queue_hold_s=S``: a serverless sample waits S seconds in the queue before it runs;
* ``queue_busy=N``: the next N serverless submits answer 503 with ``Retry-After: 1``;
* ``sample_burst_count=N, sample_burst_status=503``: the next N ``/sample`` calls to a dedicated
  sampler answer that status (replica turnover: the published client retries 400, 404, 408, 502,
  503 there);
* ``dedicated_model_name="default"``: a dedicated sampler answers 404 to a ``/sample`` whose body
  names any other ``model`` (vLLM's "model does not exist"; the published client sends no
  ``model`` to dedicated samplers).

A trainer answering 503 (shutting down) is a per-deployment switch:
``emulator.set_deployment(dep_id, shutting_down=True)`` or ``POST /_emulator/deployments/{id}``.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from loops_core.errors import InvalidRequestError
from loops_core.server.http import REASONS, TYPES

from .models import SAMPLER_TERMINAL, TRAINER_TERMINAL


@dataclass
class Faults:
    provisioning_polls: int = 0
    scaled_to_zero: bool = False
    fail_trainers: str | None = None
    fail_samplers: str | None = None
    burst_count: int = 0
    burst_status: int = 502
    short_files: bool = False
    serverless_samplers: bool = False
    queue_hold_s: float = 0.0
    queue_busy: int = 0
    sample_burst_count: int = 0
    sample_burst_status: int = 503
    dedicated_model_name: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.update()

    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names - {"reset"}
        if unknown:
            raise InvalidRequestError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(names)}",
                                      field=sorted(unknown)[0])
        if changes.pop("reset", False):
            for f in fields(self):
                setattr(self, f.name, f.default)
        for name, value in changes.items():
            setattr(self, name, value)
        if self.fail_trainers not in (None, *TRAINER_TERMINAL):
            raise InvalidRequestError(f"fail_trainers must be one of {sorted(TRAINER_TERMINAL)}", field="fail_trainers")
        if self.fail_samplers not in (None, *SAMPLER_TERMINAL):
            raise InvalidRequestError(f"fail_samplers must be one of {sorted(SAMPLER_TERMINAL)}", field="fail_samplers")
        for name in ("burst_status", "sample_burst_status"):
            if not 400 <= int(getattr(self, name)) <= 599:
                raise InvalidRequestError(f"{name} must be an HTTP error status", field=name)

    def reset(self) -> None:
        self.update(reset=True)

    def pending(self) -> list[str]:
        """The statuses a new deployment reports before its final one."""
        n = max(0, int(self.provisioning_polls))
        return ["BUILDING"] * (n // 2) + ["DEPLOYING"] * (n - n // 2)

    def take_burst(self) -> int | None:
        """The status to answer this control-plane call with, while a burst lasts."""
        with self._lock:
            if self.burst_count <= 0:
                return None
            self.burst_count -= 1
            return int(self.burst_status)

    def take_sample_burst(self) -> int | None:
        """The status to answer this dedicated ``/sample`` with, while a sample burst lasts."""
        with self._lock:
            if self.sample_burst_count <= 0:
                return None
            self.sample_burst_count -= 1
            return int(self.sample_burst_status)

    def take_queue_busy(self) -> bool:
        """Whether this serverless submit is refused as an overload (while ``queue_busy`` lasts)."""
        with self._lock:
            if self.queue_busy <= 0:
                return False
            self.queue_busy -= 1
            return True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def error(status: int, message: str, *, source: str | None = None, reason: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape loops' servers use; ``source`` sets ``X-Baseten-Error-Source`` (06:
    the gateway), as Baseten's proxies do when asked with ``X-Baseten-Accept-Error``."""
    headers = {**(headers or {}), **({"X-Baseten-Error-Source": source, "X-Baseten-Error-Code": str(status)}
                                     if source else {})}
    body = {"detail": message, "error": {"type": TYPES.get(status, "ServerError"), "message": message},
            "details": {"reason": reason or REASONS.get(status, "ERROR")}}
    return JSONResponse(body, status_code=status, headers=headers)


def base_url(request: Request) -> str:
    """The emulator's own URL as the client reached it (so any bind address works)."""
    return str(request.base_url).rstrip("/")
