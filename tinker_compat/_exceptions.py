"""Tinker's exception tree, and the one function that turns a loops error into it.

::

    TinkerError                      (also a loops_core.LoopsError)
    ├── APIError
    │   ├── APIStatusError           status_code, body
    │   │   ├── BadRequestError          400  ← InvalidRequestError (bad input, client or server side)
    │   │   ├── AuthenticationError      401  ← loops AuthenticationError
    │   │   ├── BillingError             402
    │   │   ├── PermissionDeniedError    403
    │   │   ├── NotFoundError            404  ← loops NotFoundError (unknown checkpoint or run)
    │   │   ├── ConflictError            409
    │   │   ├── UnprocessableEntityError 422
    │   │   ├── RateLimitError           429
    │   │   └── InternalServerError      5xx  ← other statuses, ServerShutdownError (503)
    │   ├── APIConnectionError           ← loops APIConnectionError (server unreachable)
    │   │   └── APITimeoutError          ← loops APITimeoutError
    │   └── APIResponseValidationError
    └── RequestFailedError           message, request_id, category
                                     ← RemoteOpError (the operation ran and failed), UnknownRequestError,
                                       SamplerVersionError

Each Tinker class also inherits the loops class it stands for (``BadRequestError`` is an
``InvalidRequestError``, ``NotFoundError`` a loops ``NotFoundError``, ...), so code written against
either SDK catches what it expects. loops raises its own classes; ``translate`` maps them, and the
shim applies it in one place (:func:`tinker_errors`), where a future's result or a direct call
leaves the shim. ``ConfigurationError`` (no such backend, missing extra) and ``FutureTimeoutError``
(a ``TimeoutError``) pass through unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import loops_core.errors as le

RequestErrorCategory = Literal["unknown", "server", "user"]


class TinkerError(le.LoopsError):
    """Root of Tinker's exceptions."""

    def __init__(self, message: str = "", **attrs: Any):
        # Bypass the loops constructors (their signatures differ); set what both sides read.
        Exception.__init__(self, message)
        self.message = message
        for key in ("status_code", "body", "field", "error_class", "operation_id", "operation"):
            setattr(self, key, attrs.pop(key, getattr(type(self), key, None)))
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type, message: str, state: dict[str, Any]) -> TinkerError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class APIError(TinkerError, le.APIError):
    pass


class APIStatusError(APIError, le.APIStatusError):
    status_code: int = 500


class APIConnectionError(APIError, le.APIConnectionError):
    pass


class APITimeoutError(APIConnectionError, le.APITimeoutError):
    pass


class APIResponseValidationError(APIError):
    pass


class BadRequestError(APIStatusError, le.InvalidRequestError):
    status_code = 400


class AuthenticationError(APIStatusError, le.AuthenticationError):
    status_code = 401


class BillingError(APIStatusError):
    status_code = 402


class PermissionDeniedError(APIStatusError, le.AuthenticationError):
    status_code = 403


class NotFoundError(APIStatusError, le.NotFoundError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError, le.InvalidRequestError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    status_code = 500


class RequestFailedError(TinkerError, le.RemoteOpError):
    """The operation was accepted and then failed (Tinker: a future resolved to an error)."""

    def __init__(self, message: str = "", request_id: str = "", category: RequestErrorCategory = "unknown",
                 **attrs: Any):
        super().__init__(message, request_id=request_id, category=category, **attrs)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    c.status_code: c for c in (BadRequestError, AuthenticationError, BillingError, PermissionDeniedError,
                               NotFoundError, ConflictError, UnprocessableEntityError, RateLimitError)}
# Server-side exception names that mean "the request was wrong" rather than "the server failed".
_USER_ERRORS = {"ValueError", "KeyError", "TypeError", "InvalidRequestError", "NotFoundError"}


def translate(exc: BaseException) -> BaseException:
    """The Tinker exception for a loops exception (``exc`` itself when there is none)."""
    if isinstance(exc, TinkerError) or not isinstance(exc, le.LoopsError):
        return exc
    msg = str(exc)
    if isinstance(exc, le.InvalidRequestError):
        status = exc.status_code or 400
        cls = UnprocessableEntityError if status == 422 else BadRequestError
        return cls(msg, status_code=status, field=exc.field)
    if isinstance(exc, le.AuthenticationError):
        return AuthenticationError(msg, status_code=401)
    if isinstance(exc, le.APITimeoutError):
        return APITimeoutError(msg)
    if isinstance(exc, le.APIConnectionError):
        return APIConnectionError(msg)
    if isinstance(exc, le.APIStatusError):
        code = exc.status_code
        cls = _BY_STATUS.get(code) or (InternalServerError if code >= 500 else APIStatusError)
        return cls(msg, status_code=code, body=exc.body)
    if isinstance(exc, le.ServerShutdownError):
        return InternalServerError(msg, status_code=503)
    if isinstance(exc, le.RemoteOpError):
        category = "user" if exc.error_class in _USER_ERRORS else "server"
        return RequestFailedError(msg, exc.operation_id or "", category, error_class=exc.error_class,
                                  operation_id=exc.operation_id, operation=exc.operation)
    if isinstance(exc, le.UnknownRequestError):
        return RequestFailedError(msg, exc.operation_id, "server", operation_id=exc.operation_id)
    if isinstance(exc, le.SamplerVersionError):
        return RequestFailedError(msg, "", "server")
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
