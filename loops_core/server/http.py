"""What the trainer and sampler apps share: JSON errors, API-key checks, body parsing.

Error bodies have one shape, readable by our client and by the published one (which takes the
first string under ``detail`` / ``error`` / ``message`` and the machine reason under
``details.reason``)::

    {"detail": "...", "error": {"type": "BadRequestError", "message": "...", "field": "..."},
     "details": {"reason": "INVALID_REQUEST"}}
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError, NotFoundError

Handler = Callable[..., Awaitable[Response]]

REASONS = {400: "INVALID_REQUEST", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "TRY_AGAIN",
           409: "CONFLICT", 410: "GONE", 503: "SHUTTING_DOWN"}
TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 408: "TryAgain",
         409: "ConflictError", 410: "GoneError", 503: "ServerShutdownError"}


def error_response(status: int, message: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    err: dict[str, Any] = {"type": TYPES.get(status, "ServerError"), "message": message}
    if field:
        err["field"] = field
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


class ApiKeyMiddleware:
    """Require ``Authorization: Api-Key <key>`` (or ``Bearer``) on every route but ``/health``."""

    def __init__(self, app: Any, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.api_key and scope["path"] != "/health":
            auth = dict(scope.get("headers") or {}).get(b"authorization", b"").decode()
            scheme, _, token = auth.partition(" ")
            if scheme.lower() not in ("api-key", "bearer") or not hmac.compare_digest(token, self.api_key):
                await error_response(401, "missing or wrong API key: send 'Authorization: Api-Key <key>'")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)
