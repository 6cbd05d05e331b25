"""Tinker's exception tree, with Tinker's constructors, and the one function that turns a loops error into it.

::

    TinkerError
    ├── APIError(message, request, *, body)
    │   ├── APIStatusError(message, response, body)     .status_code, .response, .body
    │   │   ├── BadRequestError          400  ← loops InvalidRequestError (bad input, client or server side)
    │   │   ├── AuthenticationError      401  ← loops AuthenticationError
    │   │   ├── BillingError             402
    │   │   ├── PermissionDeniedError    403
    │   │   ├── NotFoundError            404  ← loops NotFoundError (unknown checkpoint or run)
    │   │   ├── ConflictError            409
    │   │   ├── UnprocessableEntityError 422
    │   │   ├── RateLimitError           429
    │   │   └── InternalServerError      5xx  ← other statuses, loops ServerShutdownError (503)
    │   ├── APIConnectionError(request, message=...)   ← loops APIConnectionError (server unreachable)
    │   │   └── APITimeoutError(request)              ← loops APITimeoutError
    │   └── APIResponseValidationError(response, body, message=None)
    └── RequestFailedError(message, request_id, category)
                                     ← loops RemoteOpError (the operation ran and failed), UnknownRequestError,
                                       SamplerVersionError

These are Tinker's classes only (not loops' too), so code tested on loops catches what it would
catch on Tinker. loops raises its own classes; :func:`translate` maps them, building the
``httpx`` request/response Tinker's constructors take (the URL names the loops operation), and
the shim applies it in one place (:func:`tinker_errors`). The loops error stays as ``__cause__``.
``ConfigurationError`` (no such backend, missing extra) and ``FutureTimeoutError`` pass through.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import httpx

import loops_core.errors as le

from .types import RequestErrorCategory


class TinkerError(Exception):
    pass


class APIError(TinkerError):
    def __init__(self, message: str, request: httpx.Request, *, body: object | None) -> None:
        super().__init__(message)
        self.request = request
        self.message = message
        self.body = body


class APIResponseValidationError(APIError):
    def __init__(self, response: httpx.Response, body: object | None, message: str | None = None) -> None:
        super().__init__(message or "Data returned by API invalid for expected schema.", response.request, body=body)
        self.response = response
        self.status_code = response.status_code

    def __reduce__(self) -> Any:
        return (self.__class__, (self.response, self.body, self.message), None)


class APIStatusError(APIError):
    def __init__(self, message: str, response: httpx.Response, body: object | None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message, self.response, self.body), None)


class APIConnectionError(APIError):
    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request, body=None)

    def __reduce__(self) -> Any:
        return (self.__class__, (self.request, self.message), None)


class APITimeoutError(APIConnectionError):
    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request=request, message="Request timed out.")

    def __reduce__(self) -> Any:
        return (self.__class__, (self.request,), None)


class BadRequestError(APIStatusError):
    status_code: int = 400


class AuthenticationError(APIStatusError):
    status_code: int = 401


class BillingError(APIStatusError):
    status_code: int = 402


class PermissionDeniedError(APIStatusError):
    status_code: int = 403


class NotFoundError(APIStatusError):
    status_code: int = 404


class ConflictError(APIStatusError):
    status_code: int = 409


class UnprocessableEntityError(APIStatusError):
    status_code: int = 422


class RateLimitError(APIStatusError):
    status_code: int = 429


class InternalServerError(APIStatusError):
    pass


class RequestFailedError(TinkerError):
    """An operation was accepted and then failed (a future resolved to an error)."""

    def __init__(self, message: str, request_id: str, category: RequestErrorCategory) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message, self.request_id, self.category), None)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 402: BillingError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 422: UnprocessableEntityError, 429: RateLimitError}
# Server-side exception names that mean "the request was wrong" rather than "the server failed".
_USER_ERRORS = {"ValueError", "KeyError", "TypeError", "InvalidRequestError", "NotFoundError"}


def loops_request(what: str = "request") -> httpx.Request:
    """The request object Tinker's exceptions carry, for a loops call that has no HTTP request of its own."""
    return httpx.Request("POST", f"http://loops.invalid/{what}")


def status_error(status: int, message: str, body: object | None = None, what: str = "request") -> APIStatusError:
    """Tinker's exception for HTTP ``status`` (``BadRequestError`` for 400, ...)."""
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    response = httpx.Response(status, request=loops_request(what), json=body if body is not None else
                              {"detail": message})
    return cls(message, response, body)


def bad_request(message: str, field: str | None = None) -> BadRequestError:
    """``BadRequestError`` for input the shim refuses before it reaches loops; ``body`` names the field."""
    return status_error(400, message, {"detail": message, "field": field})  # type: ignore[return-value]


def translate(exc: BaseException) -> BaseException:
    """The Tinker exception for a loops exception (``exc`` itself when there is none)."""
    if isinstance(exc, TinkerError) or not isinstance(exc, le.LoopsError):
        return exc
    msg = str(exc)
    if isinstance(exc, le.InvalidRequestError):
        return status_error(exc.status_code or 400, msg, {"detail": msg, "field": exc.field})
    if isinstance(exc, le.AuthenticationError):
        return status_error(401, msg)
    if isinstance(exc, le.APITimeoutError):
        return APITimeoutError(loops_request())
    if isinstance(exc, le.APIConnectionError):
        return APIConnectionError(loops_request(), msg)
    if isinstance(exc, le.APIStatusError):
        return status_error(exc.status_code, msg, exc.body)
    if isinstance(exc, le.ServerShutdownError):
        return status_error(503, msg)
    if isinstance(exc, le.RemoteOpError):
        category = RequestErrorCategory.User if exc.error_class in _USER_ERRORS else RequestErrorCategory.Server
        return RequestFailedError(msg, exc.operation_id or "", category)
    if isinstance(exc, le.UnknownRequestError):
        return RequestFailedError(msg, exc.operation_id or "", RequestErrorCategory.Server)
    if isinstance(exc, le.SamplerVersionError):
        return RequestFailedError(msg, "", RequestErrorCategory.Server)
    return exc


@contextlib.contextmanager
def tinker_errors() -> Iterator[None]:
    """Re-raise loops errors as Tinker's (the original stays as ``__cause__``)."""
    try:
        yield
    except le.LoopsError as exc:
        new = translate(exc)
        if new is exc:
            raise
        raise new.with_traceback(exc.__traceback__) from exc


__all__ = [
    "APIConnectionError", "APIError", "APIResponseValidationError", "APIStatusError", "APITimeoutError",
    "AuthenticationError", "BadRequestError", "BillingError", "ConflictError", "InternalServerError",
    "NotFoundError", "PermissionDeniedError", "RateLimitError", "RequestFailedError", "TinkerError",
    "UnprocessableEntityError", "translate", "tinker_errors",
]
