"""The HTTP client side of the Loops data-plane protocol (httpx), and the one place where httpx
errors and HTTP statuses become ``loops_core.errors``.

Retries follow the named policies of ``loops_core.retry`` (which statuses, and why). What this
module adds:

* submits carry one ``Idempotency-Key`` reused across retries, so a retry never runs twice;
* polls hold for up to 30 s on the server and re-poll at once on 408; a server that cannot be
  reached for ``unreachable_timeout`` (30 s by default, ``LOOPS_UNREACHABLE_TIMEOUT``) is an
  ``APIConnectionError`` naming its URL, and a server process known to have exited (the local
  backend's ``Endpoint.liveness``) is one at once, with its exit code and last log lines;
* every loops server stamps its answers with ``X-Loops-Incarnation``; when that changes under a
  client, the server restarted and lost the client's state: ``ServerRestartedError``, never
  silent progress on a fresh adapter;
* a closed client raises ``ClientClosedError`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import httpx

from ._version import __version__
from .errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError, ClientClosedError,
                     InvalidRequestError, NotFoundError, RemoteOpError, ServerGoneError, ServerRestartedError,
                     ServerShutdownError, UnknownRequestError)
from .retry import DATA_POLL, DATA_SUBMIT, RetryPolicy, retry_after_seconds
from .settings import client_settings

INCARNATION_HEADER = "X-Loops-Incarnation"

POLL_READ_TIMEOUT = 35.0  # the server holds a poll for up to 30 s
# httpcore's connection pool rescans all its connections for every request it places and every
# response it releases (and asks each idle one whether its socket is readable), so a burst of N
# concurrent requests through one client costs O(N) Python per request (bench/protocol.py shows
# it against a bare httpx client at 32 in flight). So WireClient keeps a free list of httpx
# clients, each carrying one request at a time over its one keep-alive connection (the Tinker
# SDK likewise spreads requests over several clients).


@dataclass(frozen=True)
class Endpoint:
    """Where a server is: base URL, extra headers, and (in-process) an httpx transport."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    transport: httpx.AsyncBaseTransport | None = None
    api_key: str | None = field(default=None, repr=False)
    # Says why the server is certainly gone (its process exited), else None: lets a client fail at
    # once instead of waiting out ``unreachable_timeout``. Never pickled.
    liveness: Callable[[], str | None] | None = field(default=None, compare=False)
    # Awaited once before the first request: a server provisioned with its pair but waited for only
    # when first needed (a Baseten paired sampler). Never pickled.
    ready: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)
    # The environment variable a pickled client re-reads its key from (keys are never pickled).
    api_key_env: str = "LOOPS_API_KEY"
    # A queued (serverless) sampler answers /sample with 202 and an operation to poll.
    queued: bool = False

    def __getstate__(self) -> dict[str, Any]:
        # Pickles carry neither the key (it is re-read from ``api_key_env``) nor process handles.
        return {**self.__dict__, "api_key": None, "liveness": None, "transport": None, "ready": None,
                "_had_key": self.api_key is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_key = state.pop("_had_key", False)
        if had_key:
            state["api_key"] = os.environ.get(state["api_key_env"])
            if not state["api_key"]:
                raise AuthenticationError(
                    f"this pickled client talks to {state['url']}, which needs an API key; keys are not "
                    f"pickled: set {state['api_key_env']} in this process")
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def __repr__(self) -> str:  # never show the key
        return f"Endpoint(url={self.url!r})"


@contextlib.contextmanager
def translate_errors(what: str, url: str):
    """Map httpx transport errors to ours (the only such mapping in loops)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"{what}: request to {url} timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"{what}: cannot reach {url} ({type(exc).__name__}: {exc})") from exc


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            v = body.get(key)
            if isinstance(v, str):
                return v
            if isinstance(v, dict) and isinstance(v.get("message"), str):
                return v["message"]
    return str(body)[:500]


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Raise the loops error for a non-2xx answer."""
    status = response.status_code
    if status < 400:
        return
    text = error_text(response)
    field_name = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        field_name = response.json().get("error", {}).get("field")
    if status in (400, 409, 413, 422):  # wrong input, a reused Idempotency-Key, a body over the limit
        raise InvalidRequestError(f"{what}: {text}", field=field_name, status_code=status)
    if status in (401, 403):
        raise AuthenticationError(f"{what}: the server rejected the credentials ({status}): {text}")
    if status == 404:
        raise NotFoundError(f"{what}: {text}", status_code=status, body=text)
    if status == 503:
        raise ServerShutdownError(f"{what}: the server is shutting down or unavailable (503): {text}")
    error = APIStatusError(f"{what}: HTTP {status}: {text}", status_code=status, body=text)
    error.retry_after = retry_after_seconds(response.headers.get("retry-after"))
    raise error


def once(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """``fn()`` run once, however many callers await it (a failure is re-raised to each, and the
    next call tries again)."""
    task: asyncio.Task | None = None

    async def run() -> None:
        nonlocal task
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(fn())
        await asyncio.shield(task)

    return run


def accepted_operation_id(r: httpx.Response, what: str) -> str:
    """The operation id of a 202 acceptance; any other shape is an error, never a result."""
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("operation_id"), str) \
            or not data["operation_id"] or data.get("schema_version", 1) != 1:
        raise APIStatusError(f"{what}: unexpected submit answer {r.text[:200]!r}", status_code=r.status_code)
    return data["operation_id"]


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: building one costs ~0.15 s."""
    return httpx.create_ssl_context()


class WireClient:
    """The httpx.AsyncClients for one server (one per request in flight, reused; see above),
    created lazily on the SDK loop."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 600.0, ready_timeout: float = 600.0,
                 extra_headers: Mapping[str, str] | None = None, unreachable_timeout: float | None = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.unreachable_timeout = unreachable_timeout or client_settings().unreachable_timeout
        self.extra_headers = dict(extra_headers or {})
        self.incarnation: str | None = None
        self.closed = False
        self._clients: list[httpx.AsyncClient] = []  # all of them, for aclose
        self._idle: list[httpx.AsyncClient] = []  # those with no request in flight

    @property
    def url(self) -> str:
        return self.endpoint.url

    def _new_client(self) -> httpx.AsyncClient:
        headers = {"User-Agent": f"loops/{__version__}", **self.endpoint.headers, **self.extra_headers}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Api-Key {self.endpoint.api_key}"
        return httpx.AsyncClient(
            base_url=self.endpoint.url, headers=headers, transport=self.endpoint.transport, verify=ssl_context(),
            timeout=httpx.Timeout(self.timeout, connect=10.0),
            follow_redirects=True,  # Modal answers a request that runs past 150 s with a 303
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    @contextlib.contextmanager
    def _leased(self):
        """A client of its own for one request: an idle one, or a new one. An injected transport
        (in-process servers, tests) has no connection pool to spare: all requests share one."""
        if self.endpoint.transport is not None:
            if not self._clients:
                self._clients.append(self._new_client())
            yield self._clients[0]
            return
        if self._idle:
            client = self._idle.pop()
        else:
            client = self._new_client()
            self._clients.append(client)
        try:
            yield client
        finally:
            if client in self._clients:  # not closed meanwhile
                self._idle.append(client)

    async def _send(self, method: str, path: str, *, what: str, timeout: Any = None, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange, translated: transport errors become ours, and the incarnation is checked."""
        if self.closed:
            raise ClientClosedError(f"{what}: this client was closed")
        if self.endpoint.ready is not None:
            await self.endpoint.ready()
        try:
            with translate_errors(what, self.url + path), self._leased() as client:
                r = await client.request(method, path, timeout=timeout if timeout is not None
                                         else httpx.USE_CLIENT_DEFAULT, **kwargs)
        except APIConnectionError as exc:
            gone = self.endpoint.liveness() if self.endpoint.liveness is not None else None
            if gone:
                raise ServerGoneError(f"{what}: the server at {self.url} is gone: {gone}") from exc
            raise
        self._check_incarnation(r, what)
        return r

    def _check_incarnation(self, r: httpx.Response, what: str) -> None:
        seen = r.headers.get(INCARNATION_HEADER)
        if seen is None:
            return
        if self.incarnation is None:
            self.incarnation = seen
        elif seen != self.incarnation:
            raise ServerRestartedError(
                f"{what}: the server at {self.url} restarted (incarnation {self.incarnation} -> {seen}); its "
                "operations and unsaved adapter state are gone: load a checkpoint and resubmit")

    async def request(self, method: str, path: str, *, what: str, json: Any = None,
                      params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                      timeout: float | None = None, retry: bool = True, policy: RetryPolicy = DATA_SUBMIT,
                      budget: float | None = None, accept: frozenset[int] = frozenset()) -> httpx.Response:
        """One call, retried by ``policy`` for ``budget`` seconds; returns a 2xx response (or one whose
        status is in ``accept``) or raises. The default budget is ``ready_timeout`` while waiting for
        a server to come up (a provisioning policy), else the per-call ``timeout``."""
        async def attempt() -> httpx.Response:
            r = await self._send(method, path, what=what, json=json, params=params, headers=headers,
                                 timeout=timeout)
            if r.status_code not in accept:
                raise_for_status(r, what)
            return r

        if not retry:
            return await attempt()
        if budget is None:
            budget = self.ready_timeout if policy.provisioning else self.timeout
        async for attempt_state in policy.retrying(
                budget, unreachable=None if policy.provisioning else self.unreachable_timeout):
            with attempt_state:
                return await attempt()
        raise AssertionError("unreachable")  # pragma: no cover - tenacity re-raises the last error

    async def get_json(self, path: str, *, what: str, params: Mapping[str, Any] | None = None,
                       timeout: float | None = None) -> Any:
        return (await self.request("GET", path, what=what, params=params, timeout=timeout)).json()

    # ---- the operation protocol ---------------------------------------------------------------
    async def submit(self, path: str, body: dict[str, Any], *, what: str, key: str | None = None) -> str:
        """POST an operation; returns its id once the server accepted it."""
        key = key or uuid.uuid4().hex
        r = await self.request("POST", path, what=what, json=body, headers={"Idempotency-Key": key})
        return accepted_operation_id(r, what)

    async def poll(self, op_id: str, *, what: str) -> Any:
        """Long-poll ``/operations/{id}`` until it is done; returns ``result`` or raises.

        Each answer is final (done, error) or "ask again" (408, pending): a long-poll, not a retry.
        Only an unreachable server is retried, within ``unreachable_timeout``.
        """
        path = f"/operations/{op_id}"
        while True:
            r = await self.request("GET", path, what=what, policy=DATA_POLL, budget=self.unreachable_timeout,
                                   timeout=POLL_READ_TIMEOUT, accept=frozenset({404, 408}))
            if r.status_code == 408:
                continue
            if r.status_code == 404:
                raise UnknownRequestError(op_id)
            data = r.json()
            status = data.get("status")
            if status == "done":
                return data.get("result")
            if status == "error":
                raise RemoteOpError(str(data.get("error")), data.get("error_class"), operation_id=op_id,
                                    operation=what)
            await asyncio.sleep(1.0)

    async def cancel(self, op_id: str) -> None:
        """Best effort: cancel an operation nobody waits for (a queued one; a running one finishes)."""
        with contextlib.suppress(APIConnectionError, APIStatusError, ClientClosedError):
            await self._send("POST", f"/operations/{op_id}/cancel", what="cancel", timeout=5.0)

    async def aclose(self) -> None:
        self.closed = True
        clients, self._clients, self._idle = self._clients, [], []
        for client in clients:
            await client.aclose()

