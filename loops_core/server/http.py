"""What the trainer and sampler apps share: JSON errors, the request guard, body parsing.

``guard(app, ...)`` wraps a server's Starlette app. For every request it checks the API key
(non-ASCII is a 401), logs one line (method, path, status, duration, operation id) to the
``loops.server`` logger. For a
POST to a route with a request model (``requests.py``) it first reads the body within the size
limit, checks UTF-8, JSON, nesting depth and lone surrogates, validates it with the route's model
(a 400 naming the field), scopes the ``Idempotency-Key`` to (route, body) (a 409 on reuse with
another), refuses new submits with 503 once shutdown began, and cancels a ``/sample`` whose client
disconnected. The handler then reads the already-parsed body through ``json_body``.

Error bodies have one shape, readable by our client and by the published one (which takes the
first string under ``detail`` / ``error`` / ``message`` and the machine reason under
``details.reason``)::

    {"detail": "...", "error": {"type": "BadRequestError", "message": "...", "field": "..."},
     "details": {"reason": "INVALID_REQUEST"}}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError, NotFoundError
from .requests import Limits, WireRequest

log = logging.getLogger("loops.server")
MAX_ECHO = 400  # characters of a message that may quote client input

Handler = Callable[..., Awaitable[Response]]

REASONS = {400: "INVALID_REQUEST", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND", 408: "TRY_AGAIN",
           409: "CONFLICT", 410: "GONE", 413: "TOO_LARGE", 500: "INTERNAL", 503: "SHUTTING_DOWN"}
TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
         408: "TryAgain", 409: "ConflictError", 410: "GoneError", 413: "BadRequestError",
         503: "ServerShutdownError"}


def error_response(status: int, message: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > MAX_ECHO:  # never echo megabytes of a client's input back
        message = message[:MAX_ECHO] + f"... ({len(message) - MAX_ECHO} more characters)"
    err: dict[str, Any] = {"type": TYPES.get(status, "ServerError"), "message": message}
    if field:
        err["field"] = field[:MAX_ECHO]
    return JSONResponse({"detail": message, "error": err, "details": {"reason": REASONS.get(status, "ERROR")}},
                        status_code=status, headers=headers)


def pydantic_message(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after[_check(), TensorData]",))
    fld = f"{prefix}{loc}" if loc else prefix.rstrip(".")
    return f"{fld}: {e['msg']}" if fld else e["msg"], fld


def guarded(handler: Handler) -> Handler:
    """Turn bad input into a 4xx so a handler never takes the server down."""

    async def wrapped(*args: Any) -> Response:  # (request) or (self, request)
        try:
            return await handler(*args)
        except InvalidRequestError as exc:
            return error_response(400, str(exc), field=exc.field)
        except ValidationError as exc:
            msg, fld = pydantic_message(exc)
            return error_response(400, msg, field=fld)
        except NotFoundError as exc:
            return error_response(404, str(exc))

    return wrapped


async def json_body(request: Request) -> dict[str, Any]:
    parsed = request.scope.get("loops.body")
    if parsed is not None:  # the guard decoded and validated it already
        return parsed
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object", field="body")
    return body


class BadRequest(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        self.status, self.message, self.field = status, message, field
        super().__init__(message)


def decode_body(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The JSON object in ``raw``: strict UTF-8, bounded nesting, no lone surrogates. NaN and Infinity
    literals parse (some clients send them) and are refused by the route's model, naming the field."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"request body is not valid UTF-8 (bad byte at offset {exc.start})", "body") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise BadRequest(400, f"request body nests deeper than {max_depth} levels", "body") from None
    except ValueError as exc:  # JSONDecodeError, integers of more than 4300 digits
        raise BadRequest(400, f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "request body must be a JSON object", "body")
    _check_tree(body, max_depth)
    return body


def _check_tree(root: Any, max_depth: int) -> None:
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(400, f"request body nests deeper than {max_depth} levels", "body")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if type(k) is str and not k.isascii():
                _check_text(k)
            t = type(v)
            if t is dict or t is list:
                stack.append((v, depth + 1))
            elif t is str and not v.isascii():
                _check_text(v)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(400, "request body holds a lone UTF-16 surrogate (\\ud800-\\udfff) in a string; "
                              "send valid Unicode", "body") from None


def field_of(exc: ValidationError) -> tuple[str, str]:
    """(message naming the field, field) for the first error of a request model."""
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), loc or "body"


def _auth_ok(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    raw = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = raw.partition(b" ")
    # Compared as bytes: a non-ASCII header is simply a wrong key (a 401), never a decoding error.
    return scheme.lower() in (b"api-key", b"bearer") and hmac.compare_digest(token, key)


class Guard:
    """The ASGI layer in front of a server app (see the module docstring)."""

    def __init__(self, app: Any, server: Any, *, api_key: str | None, requests: dict[str, type[WireRequest]],
                 submits: frozenset[str], cancellable: frozenset[str] = frozenset(),
                 publish_routes: frozenset[str] = frozenset(), limits: Limits | None = None):
        self.app = app
        self.server = server
        self.api_key = api_key.encode() if api_key else None
        self.requests = requests
        self.submits = submits
        self.cancellable = cancellable
        self.publish_routes = publish_routes
        self.limits = limits or getattr(server, "limits", None) or Limits.from_env()
        self._keys: OrderedDict[str, str] = OrderedDict()  # Idempotency-Key -> fingerprint of (route, body)
        self._max_keys = 100_000
        self._owed: set[str] = set()  # during shutdown: operations whose answer no poll has fetched yet
        self._in_flight = 0  # submits and samples being handled now

    # ---- shutdown ------------------------------------------------------------------------------
    @property
    def shutting_down(self) -> bool:
        return bool(getattr(self.server, "shutting_down", False))

    def queues(self) -> list[Any]:
        """The server's operation queues: the trainer's, one per client stream of each run."""
        runs = getattr(self.server, "runs", None)
        return [q for r in runs.values() for q in r.queues] if isinstance(runs, dict) else []

    def begin_shutdown(self) -> None:
        """Refuse new submits (503) and fail every queued operation; the running ones finish."""
        if self.server is not None:
            self.server.shutting_down = True
        for q in self.queues():
            self._owed.update(q.shutdown())

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for running operations and requests, then up to ``limits.drain_s``
        until every operation queued or running at the signal has been fetched by a poll."""
        deadline = time.monotonic() + timeout
        while (self._in_flight or any(q.running is not None for q in self.queues())) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        polls_end = time.monotonic() + self.limits.drain_s
        while self._owed and time.monotonic() < polls_end:
            await asyncio.sleep(0.05)

    # ---- ASGI ------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        seen: dict[str, Any] = {"status": 0, "op": None, "done": False}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for k, v in message.get("headers") or []:
                    if k == b"location" and v.startswith(b"/operations/"):
                        seen["op"] = v[len(b"/operations/"):].decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                seen["done"] = True
            await send(message)

        path = scope["path"]
        if path.startswith("/operations/"):
            seen["op"] = path[len("/operations/"):]
        counted = path in self.submits
        self._in_flight += counted
        try:
            refusal = await self._admit(scope, receive)
            if isinstance(refusal, Response):
                await refusal(scope, receive, send_logged)
            else:
                await self._forward(scope, receive, send_logged, refusal)
        except Exception as exc:  # a bug, not bad input: answer 500 with no input echoed, keep serving
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not seen["status"]:
                await error_response(500, f"internal server error ({type(exc).__name__})")(scope, receive, send_logged)
        finally:
            self._in_flight -= counted
            if seen["status"] == 202 and "loops.idempotency" in scope:
                self._remember(*scope["loops.idempotency"])
            if self._owed and seen["op"] and seen["status"] in (200, 503) and path.startswith("/operations/"):
                self._owed.discard(seen["op"])
            ms = (time.monotonic() - started) * 1000
            status = seen["status"] if seen["done"] or seen["status"] else 499  # 499: the client went away
            log.info("%s %s %d %.1fms op=%s", scope.get("method"), path, status, ms, seen["op"] or "-")

    async def _admit(self, scope: dict, receive: Any) -> Response | bytes | None:
        """A refusal, or the body (already validated) to hand to the app, or None to pass through."""
        path, method = scope["path"], scope.get("method")
        headers = scope.get("headers") or []
        if self.api_key and path != "/health" and not _auth_ok(headers, self.api_key):
            return error_response(401, "missing or wrong API key: send 'Authorization: Api-Key <key>'")
        if path in self.publish_routes:
            token = getattr(self.server, "publish_token", None)
            sent = next((v for k, v in headers if k == b"x-loops-publish-token"), b"")
            if token and not hmac.compare_digest(sent, token.encode()):
                return error_response(403, "only this sampler's trainer may load or unload adapters "
                                           "(X-Loops-Publish-Token)")
        if method == "GET" and path.startswith("/operations/"):
            return _check_poll_query(scope)
        model = self.requests.get(path)
        if method != "POST" or model is None:
            return None
        if path in self.submits and self.shutting_down:
            return error_response(503, "the server is shutting down; retry against another replica")
        try:
            raw = await self._read_body(scope, receive, headers)
            context = {"limits": self.limits, **self._engine_limits()}
            if len(raw) > 1 << 20:  # ~25 ms a MB: off the event loop, so polls keep being answered
                body = await asyncio.to_thread(self._parse, raw, model, context)
            else:
                body = self._parse(raw, model, context)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, field=exc.field)
        key = next((v for k, v in headers if k == b"idempotency-key"), b"").decode("latin-1")
        if key and not (len(key) <= 256 and key.isascii() and key.isprintable() and " " not in key):
            # It becomes the operation id, a path segment of /operations/{id}.
            return error_response(400, "Idempotency-Key must be at most 256 visible ASCII characters "
                                       "(e.g. a UUID)", field="Idempotency-Key")
        if key and path in self.submits:
            fingerprint = hashlib.sha256(path.encode() + b"\n" + raw).hexdigest()
            known = self._keys.get(key)
            if known is not None and known != fingerprint:
                return error_response(409, f"Idempotency-Key {key[:80]!r} was already used for another request "
                                           "(another route or body); use a fresh key per request",
                                      field="Idempotency-Key")
            scope["loops.idempotency"] = (key, fingerprint)  # remembered once the submit is accepted
        scope["loops.body"] = body
        return raw

    def _parse(self, raw: bytes, model: type[WireRequest], context: dict[str, Any]) -> dict[str, Any]:
        body = decode_body(raw, self.limits.max_json_depth)
        try:
            model.model_validate(body, context=context)
        except ValidationError as exc:
            msg, fld = field_of(exc)
            raise BadRequest(400, msg, fld) from None
        return body

    def _remember(self, key: str, fingerprint: str) -> None:
        self._keys[key] = fingerprint
        self._keys.move_to_end(key)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)

    def _engine_limits(self) -> dict[str, Any]:
        engine = getattr(self.server, "engine", None)
        return {"max_seq_len": getattr(engine, "max_seq_len", None), "vocab_size": getattr(engine, "vocab_size", None)}

    async def _read_body(self, scope: dict, receive: Any, headers: list[tuple[bytes, bytes]]) -> bytes:
        cap = self.limits.max_body_bytes
        declared = next((v for k, v in headers if k == b"content-length"), None)
        too_big = BadRequest(413, f"request body is larger than this server's limit of {cap} bytes "
                                  "(LOOPS_MAX_BODY_BYTES); split the batch", "body")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "the client disconnected while sending the body", "body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _forward(self, scope: dict, receive: Any, send: Any, raw: bytes | None) -> None:
        if raw is None:
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        if scope["path"] not in self.cancellable:
            await self.app(scope, replay, send)
            return
        # The body is read: the only message left is the disconnect. If it comes first, stop the work.
        work = asyncio.ensure_future(self.app(scope, replay, send))
        watch = asyncio.ensure_future(receive())
        stopped = False
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and watch.done() and watch.result().get("type") == "http.disconnect":
                stopped = True
                gone.set()
                work.cancel()
                log.info("%s %s: the client disconnected; the request was cancelled", scope.get("method"),
                         scope["path"])
            try:
                await work
            except asyncio.CancelledError:
                if not stopped:
                    raise
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()


def _check_poll_query(scope: dict) -> Response | None:
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    for raw in query.get("timeout", []):
        try:
            ok = math.isfinite(float(raw)) and float(raw) >= 0
        except ValueError:
            ok = False
        if not ok:
            return error_response(400, "timeout must be a finite number of seconds >= 0", field="timeout")
    return None


def find_guard(app: Any) -> Guard | None:
    """The Guard inside ``app`` (a server's app may be wrapped, e.g. by IncarnationMiddleware)."""
    while app is not None and not isinstance(app, Guard):
        app = getattr(app, "app", None)
    return app


def guard(app: Any, server: Any, *, api_key: str | None, role: str) -> Guard:
    """The guard for a trainer (``role="trainer"``) or sampler app."""
    from .requests import SAMPLER_REQUESTS, TRAINER_REQUESTS

    if role == "trainer":
        return Guard(app, server, api_key=api_key, requests=TRAINER_REQUESTS, submits=frozenset(TRAINER_REQUESTS))
    samples = frozenset({"/sample", "/v1/completions"})
    return Guard(app, server, api_key=api_key, requests=SAMPLER_REQUESTS, submits=samples, cancellable=samples,
                 publish_routes=frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}))


# Kept for callers that only need the key check (the emulator's apps).
def ApiKeyMiddleware(app: Any, api_key: str | None) -> Guard:  # noqa: N802
    return Guard(app, None, api_key=api_key, requests={}, submits=frozenset())
