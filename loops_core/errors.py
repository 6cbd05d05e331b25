"""Every error loops raises, under one root.

::

    LoopsError
    ├── ConfigurationError            the set-up is wrong before any request is made
    │   ├── BackendNotFoundError      unknown backend name (the message lists the installed ones)
    │   ├── BackendUnavailableError   the backend's extra is not installed (names the pip command)
    │   └── AuthenticationError       missing or rejected credentials (401/403)
    ├── InvalidRequestError           bad input, found on the client or answered 4xx by a server;
    │                                 also a ValueError. ``field`` names the offending field.
    ├── APIError                      the transport or the server failed
    │   ├── APIConnectionError        the server could not be reached (within the data-plane budget)
    │   │   ├── APITimeoutError       a request took longer than its timeout
    │   │   ├── ServerRestartedError  the server restarted: its operations and adapters are gone
    │   │   └── ServerGoneError       the server's process exited (local backend): said at once
    │   ├── APIStatusError            an unexpected HTTP status (``status_code``, ``body``)
    │   │   └── NotFoundError         404 on a resource (a checkpoint, a run)
    │   ├── ServerShutdownError       503: the server is shutting down; retry elsewhere
    │   ├── DeploymentFailedError     a trainer/sampler deployment reached a terminal state
    │   │                             (FAILED, STOPPED, PREEMPTED, ...): ``status``, ``deployment_id``
    │   └── UnknownRequestError       404 on an operation id: resubmit (idempotency keys dedupe)
    ├── RemoteOpError                 the server ran the operation and it failed (``error_class``)
    ├── SamplerVersionError           the sampler never reached the published version
    ├── ClientClosedError             the client, or the ServiceClient it came from, was closed
    └── FutureTimeoutError            ``.result(timeout)`` expired; also a TimeoutError. The future is
                                      not spoiled: a later ``.result()`` still returns the value.

Errors from httpx are translated into these in exactly one place, ``loops_core.wire``.
"""

from __future__ import annotations

from typing import Any


class LoopsError(Exception):
    """Root of every loops exception."""


class ConfigurationError(LoopsError):
    pass


class BackendNotFoundError(ConfigurationError, KeyError):
    def __init__(self, name: str, available: list[str], not_installed: dict[str, str] | None = None):
        self.name = name
        self.available = available
        missing = "".join(f"; {n} needs: pip install -e '.[{extra}]'" for n, extra in sorted((not_installed or {}).items()))
        super().__init__(
            f"Unknown loops backend {name!r}. Installed backends: {', '.join(available) or '(none)'}{missing}. "
            "Set LOOPS_BACKEND or pass backend= to one of these."
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class BackendUnavailableError(ConfigurationError, ImportError):
    def __init__(self, name: str, extra: str | None, cause: BaseException | None = None):
        self.name = name
        self.extra = extra
        # "loops" on PyPI is another project: the extra installs from a checkout of this one.
        hint = f" Install its extra from your loops checkout: pip install -e '.[{extra}]'" if extra else ""
        detail = f" ({cause})" if cause else ""
        super().__init__(f"The {name!r} backend cannot be loaded{detail}.{hint}")


class AuthenticationError(ConfigurationError):
    pass


class InvalidRequestError(LoopsError, ValueError):
    """Bad input. Nothing was executed and no state changed; fix the field and call again."""

    def __init__(self, message: str, *, field: str | None = None, status_code: int | None = None):
        self.field = field
        self.status_code = status_code
        super().__init__(message)


class APIError(LoopsError):
    pass


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class ServerRestartedError(APIConnectionError):
    """The server's incarnation changed: it restarted, so queued operations and unsaved adapter
    state are gone. Reload a checkpoint (``load_state_with_optimizer``) and resubmit."""


class ServerGoneError(APIConnectionError):
    """The server's process is known to have exited (its exit code and log tail are in the message)."""


class APIStatusError(APIError):
    def __init__(self, message: str, *, status_code: int, body: Any = None):
        self.status_code = status_code
        self.body = body
        super().__init__(message)


class NotFoundError(APIStatusError):
    pass


class ServerShutdownError(APIError):
    """The server answered 503: it is shutting down. Retry against another replica."""

    status_code = 503


class DeploymentFailedError(APIError):
    """A trainer or sampler deployment reached a terminal state (FAILED, STOPPED, PREEMPTED, ...)."""

    def __init__(self, message: str, *, deployment_id: str | None, status: str):
        self.deployment_id = deployment_id
        self.status = status
        super().__init__(message)


class UnknownRequestError(APIError):
    """The server has no record of this operation (restarted, or the result expired)."""

    def __init__(self, operation_id: str):
        self.operation_id = operation_id
        super().__init__(
            f"The server has no record of operation {operation_id!r} (it restarted, or the result "
            "expired). Resubmit the call if the work is still needed."
        )


class RemoteOpError(LoopsError):
    """The server ran the operation and it failed. ``error_class`` is the server's exception name."""

    def __init__(self, message: str, error_class: str | None = None, *, operation_id: str | None = None,
                 operation: str | None = None):
        self.error_class = error_class
        self.operation_id = operation_id
        self.operation = operation
        super().__init__(f"{error_class or 'Error'}: {message}" if error_class else message)


class SamplerVersionError(LoopsError, RuntimeError):
    pass


class ClientClosedError(LoopsError, RuntimeError):
    """The client (or the ServiceClient it came from) was closed; nothing was sent."""


class FutureTimeoutError(LoopsError, TimeoutError):
    """``.result(timeout)`` expired before the operation finished. The future stays usable."""


__all__ = [
    "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AuthenticationError",
    "BackendNotFoundError", "BackendUnavailableError", "ClientClosedError", "ConfigurationError", "DeploymentFailedError",
    "FutureTimeoutError",
    "InvalidRequestError", "LoopsError", "NotFoundError", "RemoteOpError", "SamplerVersionError",
    "ServerGoneError", "ServerRestartedError", "ServerShutdownError", "UnknownRequestError",
]
