"""The Baseten emulator's gateway: ``/gw/{deployment_id}/sync/...`` in front of each deployment.

It checks what Baseten's gateway checks (the deployment exists, ``X-Run-Id`` / ``X-Sampler-Id``
match it and are not both sent, a serverless request names its run, sampler or checkpoint), answers
502 while a deployment is not ready and 503 once it is stopping, and otherwise passes the request to
the deployment's app, or, for a serverless sampler's ``/sample`` and ``/operations``, to its queue
(``emulator_serverless``). Its own refusals carry ``X-Baseten-Error-Source: 06``. ``/sample`` bodies
are recorded, and a dedicated sampler's ``/sample`` honours the ``sample_burst_*`` and
``dedicated_model_name`` faults.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse, Response

from .emulator_faults import error

if TYPE_CHECKING:  # pragma: no cover
    from .emulator import Emulator
    from .emulator_deployments import Deployment


async def gateway(emu: "Emulator", scope: dict, receive: Any, send: Any, headers: dict[str, str]) -> None:
    """``/gw/{deployment_id}/...``: the header checks of Baseten's gateway, then the deployment."""
    _, _, dep_id, *rest = scope["path"].split("/", 4)
    dep = emu.deployments.get(dep_id)
    action = rest[0] if rest else ""
    run_id, sampler_id = headers.get("x-run-id"), headers.get("x-sampler-id")
    if dep is None:
        response = error(404, f"no deployment {dep_id!r}", source="06")
    elif run_id and sampler_id:
        response = error(400, "name either X-Run-Id or X-Sampler-Id, not both", source="06")
    elif (run_id and run_id != dep.run_id) or (sampler_id and sampler_id != dep.sampler_id):
        response = error(403, "the X-Run-Id / X-Sampler-Id header does not match this deployment", source="06")
    elif action == "wake" and scope["method"] == "POST":
        response = JSONResponse({"status": "waking" if dep.wake() else "awake"}, status_code=202)
    elif action != "sync":
        response = error(404, f"unknown gateway route {scope['path']!r}", source="06")
    elif dep.shutting_down or dep.terminal:
        response = error(503, f"deployment {dep.id} is shutting down ({dep.status()})")
    elif dep.serverless and not (run_id or sampler_id or headers.get("x-checkpoint-path")):
        response = error(400, "name the run (X-Run-Id), the sampler (X-Sampler-Id) or the checkpoint "
                              "(X-Checkpoint-Path) on every serverless request", source="06",
                         reason="run_or_sampler_required")
    elif dep.status() != "ACTIVE" or dep.app is None:
        response = error(502, f"deployment {dep.id} is not ready ({dep.status()})")
    else:
        sub = "/" + (rest[1] if len(rest) > 1 else "")
        if sub == "/health":
            dep.count_health_hit()
        if sub == "/sample" and scope["method"] == "POST":
            body = await _read_body(receive)
            receive = _replay(body, receive)
            scope["state"]["record"]["body"] = _json_or_none(body)
            if dep.queue is None:
                refused = _dedicated_sample_refusal(emu, dep, scope["state"]["record"]["body"])
                if refused is not None:
                    return await refused(scope, receive, send)
        if dep.queue is not None and (sub == "/sample" or sub.startswith("/operations/")):
            body = await _read_body(receive)
            query = dict(parse_qsl(scope["query_string"].decode()))
            response = await dep.queue.handle(scope["method"], sub, headers, body, query)
            return await response(scope, receive, send)
        prefix = f"/gw/{dep_id}/sync"
        inner = {**scope, "path": sub, "raw_path": sub.encode(), "root_path": scope.get("root_path", "") + prefix}
        return await dep.app(inner, receive, send)
    await response(scope, receive, send)

def _dedicated_sample_refusal(emu: "Emulator", dep: "Deployment", body: Any) -> Response | None:
    """Faults of a dedicated sampler's ``/sample``: replica turnover, vLLM's model names."""
    if (status := emu.faults.take_sample_burst()) is not None:
        return error(status, f"injected fault: HTTP {status} (replica turnover)")
    name = emu.faults.dedicated_model_name
    if name and isinstance(body, dict) and body.get("model") not in (None, name):
        return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist.",
                                       "type": "NotFoundError", "code": 404}}, status_code=404)
    return None


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _replay(body: bytes, original: Any) -> Any:
    """A ``receive`` that hands out the already-read body once, then the client's own messages
    (so an app waiting for ``http.disconnect`` still sees a real one)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else await original()

    return receive


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        return None
