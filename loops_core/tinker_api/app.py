"""The HTTP routes of Tinker's API (as tinker==0.38.0 calls them), over ``TinkerService``.

Statuses are chosen for what the SDK does with them: 400 → ``BadRequestError``, 401 →
``AuthenticationError``, 404 → ``NotFoundError``, all raised at once (the SDK retries only 408,
409, 429 and 5xx, and a 400 without a body). No route answers 5xx: an unexpected failure is a 400
that names it, so a script stops with the reason instead of retrying for minutes. Routes of Tinker
features loops does not offer answer 400 with the reason (``UNSUPPORTED``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidRequestError, NotFoundError
from . import convert
from .futures import Proto
from .service import TinkerService

log = logging.getLogger("loops.tinker_api")
PROTO = "application/x-protobuf"
SDK_VERSION = "0.38.0"

# The client config this server hands the SDK: plain API keys (no JWT exchange), zstd-compressed
# protobuf forward/backward bodies, chunks sent one after another (the loops trainer runs one run's
# requests in order), httpx transport, per-request sample polling.
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "credential_default_source": "api_key", "proto_compress_fwdbwd": True,
                 "parallel_fwdbwd_chunks": False, "use_pyqwest_transport": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False}
DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}

UNSUPPORTED = {
    ("POST", "/api/v1/auth/token"): "JWT exchange is off on this server (client config pjwt_auth_enabled=false)",
    ("GET", "/api/v1/auth/apikey/me"): "loops keeps no accounts",
    ("DELETE", "/api/v1/auth/apikey/me"): "loops keeps no accounts",
    ("POST", "/api/v1/copy_weights"): "loops has no projects to copy checkpoints between",
    ("POST", "/api/v1/create_custom_loss"): "server-side custom losses are off (forward_backward_custom runs "
                                            "the loss in the client)",
    ("POST", "/api/v1/save_weights_external"): "external weights are not supported; use save_weights_for_sampler "
                                               "(a PEFT adapter directory)",
    ("POST", "/api/v1/retrieve_futures"): "session polling is off (client config sample_use_retrieve_futures=false)",
    ("GET", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/external_weights_urls"):
        "checkpoint files are plain directories under LOOPS_HOME on the server",
    ("DELETE", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}"): "deleting checkpoints is not offered; "
                                                                         "remove the directory under LOOPS_HOME",
    ("POST", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/publish"): "loops has no public checkpoints",
    ("DELETE", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/publish"): "loops has no public checkpoints",
    ("PUT", "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/ttl"): "loops checkpoints do not expire",
    ("POST", "/api/v1/sessions/search"): "session search is not offered; GET /api/v1/sessions lists them",
    ("PUT", "/api/v1/sessions/{session_id}/project"): "loops has no projects",
    ("GET", "/api/v1/sessions/{session_id}/trace_export"): "loops records no traces",
    ("GET", "/api/v1/audit"): "loops keeps no audit log",
    ("GET", "/api/v1/billing/usage/events"): "loops has no billing",
    ("GET", "/api/v1/billing/usage/checkpoints/current"): "loops has no billing",
}


def error(status: int, message: str, *, field: str | None = None) -> JSONResponse:
    reason = {400: "INVALID_REQUEST", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 410: "GONE"}.get(status, "ERROR")
    return JSONResponse({"detail": message, "error": message, "field": field, "reason": reason}, status_code=status)


def create_app(svc: TinkerService, *, api_key: str | None = None) -> Any:
    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"the body is not valid JSON: {exc}", field="body") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object", field="body")
        return body

    def future(request_id: str, model_id: Any = None, **extra: Any) -> JSONResponse:
        return JSONResponse({"request_id": request_id, "model_id": model_id, **extra})

    # ---- config, sessions, health ----------------------------------------------------------------
    async def client_config(request: Request) -> Response:
        await body_json(request)
        return JSONResponse(CLIENT_CONFIG)

    async def dynamic_config(request: Request) -> Response:
        return JSONResponse(DYNAMIC_CONFIG)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def capabilities(request: Request) -> Response:
        return JSONResponse({"supported_models": [{"model_name": svc.base_model, "trainable": True,
                                                   "sampleable": True}]})

    async def telemetry(request: Request) -> Response:
        return JSONResponse({"status": "accepted"})  # accepted and dropped

    async def create_session(request: Request) -> Response:
        body = await body_json(request)
        answer = {"type": "create_session", "session_id": svc.create_session(body)}
        if body.get("sdk_version") != SDK_VERSION:  # the SDK logs this warning for its user
            answer["warning_message"] = (f"this loops server speaks Tinker's API as tinker=={SDK_VERSION} does; "
                                         f"this client is tinker {body.get('sdk_version')}")
        return JSONResponse(answer)

    async def heartbeat(request: Request) -> Response:
        session = svc.session((await body_json(request)).get("session_id"))
        if session.finished:
            return error(410, f"session {session.session_id} has finished")
        return JSONResponse({"type": "session_heartbeat"})

    async def finish_session(request: Request) -> Response:
        svc.session(request.path_params["session_id"]).finished = True
        return Response(status_code=200)

    async def list_sessions(request: Request) -> Response:
        return JSONResponse({"sessions": list(svc.sessions)})

    async def get_session(request: Request) -> Response:
        s = svc.session(request.path_params["session_id"])
        return JSONResponse({"training_run_ids": s.model_ids, "sampler_ids": s.sampler_ids,
                             "user_metadata": s.user_metadata})

    # ---- models and training -------------------------------------------------------------------
    async def create_model(request: Request) -> Response:
        return future(svc.create_model(await body_json(request)))

    async def get_info(request: Request) -> Response:
        return JSONResponse(svc.get_info((await body_json(request)).get("model_id")))

    async def forward_backward(request: Request) -> Response:
        raw, encoding = await request.body(), request.headers.get("content-encoding")
        msg = await asyncio.to_thread(lambda: convert.parse_forward_backward(convert.decompress(raw, encoding)))
        return future(await svc.forward_backward(msg), msg.model_id)

    def model_op(name: str) -> Any:
        """A JSON route that submits ``svc.<name>(body)`` for the body's model and answers its future."""
        async def route(request: Request) -> Response:
            body = await body_json(request)
            return future(await getattr(svc, name)(body), body.get("model_id"))

        return route

    optim_step, save_weights = model_op("optim_step"), model_op("save_weights")
    save_for_sampler, load_weights = model_op("save_weights_for_sampler"), model_op("load_weights")

    # ---- sampling --------------------------------------------------------------------------------
    async def create_sampling_session(request: Request) -> Response:
        sampler_id = await svc.create_sampling_session(await body_json(request))
        return JSONResponse({"type": "create_sampling_session", "sampling_session_id": sampler_id})

    async def join_sampling_session(request: Request) -> Response:
        s = svc.sampler((await body_json(request)).get("sampling_session_id"))
        s.clones += 1
        return JSONResponse({"type": "join_sampling_session", "client_counter": s.clones})

    async def get_sampler(request: Request) -> Response:
        s = svc.sampler(request.path_params["sampler_id"])
        return JSONResponse({"sampler_id": s.sampler_id, "base_model": s.base_model, "model_path": s.model_path})

    async def asample(request: Request) -> Response:
        request_id, sequence_ids = svc.asample(await body_json(request))
        return future(request_id, sample_sequence_ids=sequence_ids)

    # ---- futures ---------------------------------------------------------------------------------
    async def retrieve_future(request: Request) -> Response:
        request_id = (await body_json(request)).get("request_id")
        if not isinstance(request_id, str):
            raise InvalidRequestError("request_id must be a string", field="request_id")
        state, result = await svc.futures.retrieve(request_id)
        if state == "pending":
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if state == "failed":
            return JSONResponse(result)
        if isinstance(result, Proto):
            if PROTO in request.headers.get("accept", ""):
                return Response(result.data, media_type=PROTO)
            return JSONResponse(result.json)
        return JSONResponse(result)

    async def cancel_future(request: Request) -> Response:
        svc.futures.cancel(str((await body_json(request)).get("request_id")))
        return Response("null", media_type="application/json")

    # ---- runs and checkpoints ------------------------------------------------------------------
    def page(request: Request, items: list[Any], key: str) -> JSONResponse:
        limit = _int_param(request, "limit", 20)
        offset = _int_param(request, "offset", 0)
        return JSONResponse({key: items[offset:offset + limit],
                             "cursor": {"offset": offset, "limit": limit, "total_count": len(items)}})

    async def training_runs(request: Request) -> Response:
        runs = [await svc.training_run(mid) for mid in sorted(svc.models, key=lambda m: svc.models[m].created_at)]
        return page(request, runs, "training_runs")

    async def training_run(request: Request) -> Response:
        return JSONResponse(await svc.training_run(request.path_params["run"]))

    async def run_checkpoints(request: Request) -> Response:
        return JSONResponse({"checkpoints": await svc.checkpoints(request.path_params["run"])})

    async def user_checkpoints(request: Request) -> Response:
        everything = [c for mid in list(svc.models) for c in await svc.checkpoints(mid)]
        return page(request, sorted(everything, key=lambda c: c["time"], reverse=True), "checkpoints")

    async def weights_info(request: Request) -> Response:
        return JSONResponse(await svc.weights_info((await body_json(request)).get("tinker_path")))

    def unsupported(reason: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return error(400, f"{request.method} {request.url.path} is not offered by loops: {reason}")
        return handler

    served = [
        ("POST", "/api/v1/client/config", client_config),
        ("POST", "/api/v1/client/dynamic_config", dynamic_config),
        ("GET", "/api/v1/healthz", healthz),
        ("GET", "/api/v1/get_server_capabilities", capabilities),
        ("POST", "/api/v1/telemetry", telemetry),
        ("POST", "/api/v1/create_session", create_session),
        ("POST", "/api/v1/session_heartbeat", heartbeat),
        ("POST", "/api/v1/sessions/{session_id}/finish", finish_session),
        ("GET", "/api/v1/sessions", list_sessions),
        ("GET", "/api/v1/sessions/{session_id}", get_session),
        ("POST", "/api/v1/create_model", create_model),
        ("POST", "/api/v1/get_info", get_info),
        ("POST", "/api/v1/forward_backward", forward_backward),
        ("POST", "/api/v1/optim_step", optim_step),
        ("POST", "/api/v1/save_weights", save_weights),
        ("POST", "/api/v1/save_weights_for_sampler", save_for_sampler),
        ("POST", "/api/v1/load_weights", load_weights),
        ("POST", "/api/v1/create_sampling_session", create_sampling_session),
        ("POST", "/api/v1/join_sampling_session", join_sampling_session),
        ("GET", "/api/v1/samplers/{sampler_id}", get_sampler),
        ("POST", "/api/v1/asample", asample),
        ("POST", "/api/v1/retrieve_future", retrieve_future),
        ("POST", "/api/v1/cancel_future", cancel_future),
        ("GET", "/api/v1/training_runs", training_runs),
        ("GET", "/api/v1/training_runs/{run}", training_run),
        ("GET", "/api/v1/training_runs/{run}/checkpoints", run_checkpoints),
        ("GET", "/api/v1/checkpoints", user_checkpoints),
        ("POST", "/api/v1/weights_info", weights_info),
    ] + [(method, path, unsupported(reason)) for (method, path), reason in UNSUPPORTED.items()]
    submits = {create_model, forward_backward, optim_step, save_weights, save_for_sampler, load_weights, asample}
    once = Idempotent()
    routes = [Route(path, _guarded(once(handler) if handler in submits else handler), methods=[method])
              for method, path, handler in served]
    app = Starlette(routes=routes)
    app.state.routes_served = [(method, path) for method, path, _ in served]
    return ApiKeyCheck(app, api_key) if api_key else app


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidRequestError(f"query parameter {name}={raw!r} must be a non-negative integer", field=name)
    return int(raw)


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Bad input → 400, unknown ids → 404, anything unexpected → 400 naming it; the server keeps serving."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except InvalidRequestError as exc:
            return error(400, str(exc), field=exc.field)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            return error(400, f"{where}: {e['msg']}" if where else e["msg"], field=where or None)
        except NotFoundError as exc:
            return error(404, str(exc))
        except Exception as exc:  # noqa: BLE001 - a 5xx would make the SDK retry for minutes
            log.exception("%s %s failed", request.method, request.url.path)
            return error(400, f"loops could not run {request.url.path}: {type(exc).__name__}: {exc}")

    return wrapped


class Idempotent:
    """A retried submission gets the first one's answer, not a second run.

    The SDK's HTTP client puts one ``X-Idempotency-Key`` on a request and all its retries (after a
    timeout, say); a retry that arrives while the first is still being handled waits for it.
    """

    def __init__(self, keep: int = 10_000):
        self.keep = keep
        self.answers: OrderedDict[str, asyncio.Future[Response]] = OrderedDict()

    def __call__(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            key = request.headers.get("x-idempotency-key")
            if not key:
                return await handler(request)
            key = f"{request.url.path} {key}"
            if key in self.answers:
                first = await asyncio.shield(self.answers[key])
                return Response(first.body, status_code=first.status_code, media_type=first.media_type)
            answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            self.answers[key] = answer
            while len(self.answers) > self.keep:
                self.answers.popitem(last=False)
            try:
                response = await handler(request)
            except BaseException as exc:  # bad input raised here is answered by _guarded; forget it
                self.answers.pop(key, None)
                answer.set_exception(exc)
                answer.exception()  # retrieved: no "never retrieved" warning when nobody waits
                raise
            if response.status_code >= 400:
                self.answers.pop(key, None)  # only successful submissions are remembered
            answer.set_result(response)
            return response

        return wrapped


class ApiKeyCheck:
    """Require the key the SDK sends as ``X-API-Key`` (or ``Authorization: Bearer``), except on healthz."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.api_key = api_key
        self.state = app.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/api/v1/healthz":
            headers = dict(scope.get("headers") or {})
            token = headers.get(b"x-api-key", b"").decode()
            if not token:
                token = headers.get(b"authorization", b"").decode().partition(" ")[2]
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await error(401, "missing or wrong API key: set TINKER_API_KEY (or api_key=) to the key this "
                                 "server was started with")(scope, receive, send)
                return
        await self.app(scope, receive, send)
