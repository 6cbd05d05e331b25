"""The async client of the Baseten Loops control plane (sessions, trainers, samplers, checkpoints).

Every request carries ``Authorization: Api-Key <key>``, ``User-Agent: loops/<version>`` and
``X-Baseten-Accept-Error: 1`` (Baseten's proxies then say which layer rejected a request).

Retries follow ``loops_core.retry.CONTROL_PLANE`` (on the control plane a 503 means "overloaded,
try again", not "this replica is shutting down" as on the data plane):

* 429 (honouring ``Retry-After``), 502, 503 and 504, and connection failures (a POST only when the
  request never left), are retried with capped, jittered exponential backoff for ``retry_budget_s``
  seconds from the first attempt (0: no retries); ``retry_backoff_s`` is the first wait;
* nothing else is retried: 4xx and 500 answers are final.

Errors are the public loops types: 401/403 is ``AuthenticationError`` naming ``BASETEN_API_KEY``,
an unreachable base URL is ``APIConnectionError`` naming ``LOOPS_BASE_URL``, 400/422 is
``InvalidRequestError``, 404 ``NotFoundError``; the rest go through ``loops_core.wire.raise_for_status``.
The API key never appears in a message: server texts are scrubbed of it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from loops_core import __version__
from loops_core.errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError,
                               DeploymentFailedError, InvalidRequestError, LoopsError)
from loops_core.types import Checkpoint, CheckpointFile, CheckpointFilesResponse, ServerCapabilities
from loops_core.retry import CONTROL_PLANE, RetryPolicy, retry_after_seconds
from loops_core.wire import error_text, raise_for_status, ssl_context, translate_errors

from .models import (CheckpointList, RunEnvelope, RunRecord, SamplerDeployment, SamplerEnvelope, SamplerRecord,
                     SessionEnvelope, SessionRecord, TrainerDeploymentEnvelope)

log = logging.getLogger("loops.baseten")

__all__ = ["ControlPlane", "DeploymentFailedError", "control_plane_policy"]

ENV_API_KEY = "BASETEN_API_KEY"
ENV_BASE_URL = "LOOPS_BASE_URL"
DEFAULT_BASE_URL = "https://api.baseten.co"
DEFAULT_RETRY_BUDGET_S = 60.0
CREATE_TIMEOUT = 300.0  # session / trainer / sampler creation can wait on capacity
READ_TIMEOUT = 60.0

M = TypeVar("M", bound=BaseModel)


def control_plane_policy(backoff_s: float = CONTROL_PLANE.initial) -> RetryPolicy:
    """``CONTROL_PLANE`` with its first wait at ``backoff_s``; the cap keeps its ratio to it (16x)."""
    if backoff_s == CONTROL_PLANE.initial:
        return CONTROL_PLANE
    return dataclasses.replace(CONTROL_PLANE, initial=backoff_s,
                               max_wait=CONTROL_PLANE.max_wait * backoff_s / CONTROL_PLANE.initial)


class ControlPlane:
    """One session's connection to ``{base_url}/v1/loops`` (the httpx client is made on first use,
    on the SDK loop)."""

    def __init__(self, base_url: str, api_key: str, *, policy: RetryPolicy = CONTROL_PLANE,
                 retry_budget_s: float = DEFAULT_RETRY_BUDGET_S, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.root = f"{self.base_url}/v1/loops"
        self._api_key = api_key
        self.policy = policy
        self.retry_budget_s = retry_budget_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"ControlPlane(base_url={self.base_url!r})"

    # ---- plumbing ------------------------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        return {"User-Agent": f"loops/{__version__} (baseten)", "X-Baseten-Accept-Error": "1",
                "Authorization": f"Api-Key {self._api_key}"}

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self.headers, transport=self._transport, verify=ssl_context(),
                                             timeout=httpx.Timeout(READ_TIMEOUT, connect=10.0))
        return self._client

    def scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    @contextlib.contextmanager
    def _scrubbed(self):
        """Whatever escapes carries no copy of the key (a server could echo it back)."""
        try:
            yield
        except LoopsError as exc:
            if self._api_key and any(self._api_key in str(a) for a in exc.args):
                exc.args = tuple(self.scrub(str(a)) for a in exc.args)
            raise

    async def request(self, method: str, url: str, *, what: str, json: Any = None,
                      params: dict[str, Any] | None = None, timeout: float | None = None) -> httpx.Response:
        """One call under the retry policy above; returns a 2xx response or raises a loops error."""
        with self._scrubbed():
            try:
                async for attempt in self.policy.retrying(self.retry_budget_s):
                    final: APIConnectionError | None = None
                    with attempt:
                        try:
                            return await self._send(method, url, what=what, json=json, params=params,
                                                    timeout=timeout, attempts=attempt.retry_state.attempt_number)
                        except APIConnectionError as exc:
                            sent = not isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))
                            if sent and method != "GET":
                                final = exc  # it may have reached the server: resending could act twice
                            else:
                                raise
                    if final is not None:
                        raise final
            except APIConnectionError as exc:
                raise self._unreachable(exc, what) from exc.__cause__
        raise AssertionError("unreachable")  # pragma: no cover - tenacity re-raises the last error

    async def _send(self, method: str, url: str, *, what: str, json: Any, params: dict[str, Any] | None,
                    timeout: float | None, attempts: int) -> httpx.Response:
        """One attempt: a 2xx response, or the loops error for its status (carrying ``status_code``
        and ``retry_after``, which the policy reads)."""
        with translate_errors(what, _no_query(url)):
            r = await self.client().request(method, url, json=json, params=params,
                                            timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        if r.status_code >= 400:
            log.debug("%s: HTTP %s (attempt %d)", what, r.status_code, attempts)
            raise self._status_error(r, what, attempts)
        return r

    def _unreachable(self, exc: APIConnectionError, what: str) -> APIConnectionError:
        cls = APITimeoutError if isinstance(exc, APITimeoutError) else APIConnectionError
        return cls(f"{what}: cannot reach the Baseten control plane at {self.base_url} "
                   f"({type(exc.__cause__).__name__}). Check LOOPS_BASE_URL (or base_url=) and the network.")

    def _status_error(self, r: httpx.Response, what: str, attempts: int) -> LoopsError:
        status, text = r.status_code, self.scrub(error_text(r))
        if status in (401, 403):
            return AuthenticationError(
                f"{what}: Baseten rejected the API key (HTTP {status}: {text}). Set BASETEN_API_KEY (or pass "
                f"api_key=) to a valid key for {self.base_url}.")
        if _reason(r) == "NOT_PRESIGNABLE":
            return InvalidRequestError(f"{what}: this checkpoint's files cannot be presigned ({text}); "
                                       "volume-backed checkpoints are not supported by loops yet",
                                       field="checkpoint_id", status_code=status)
        if status in self.policy.statuses or status >= 500:
            # not raise_for_status: there a 503 is a data-plane replica shutting down, for good
            error = APIStatusError(f"{what}: the Baseten control plane answered HTTP {status} "
                                   f"({attempts} attempt{'s' * (attempts > 1)}); giving up: {text}",
                                   status_code=status, body=text)
            error.retry_after = retry_after_seconds(r.headers.get("retry-after"))  # type: ignore[attr-defined]
            return error
        try:
            raise_for_status(r, what)
        except LoopsError as exc:
            return exc
        return APIStatusError(f"{what}: HTTP {status}: {text}", status_code=status, body=text)  # pragma: no cover

    async def _json(self, model: type[M], method: str, url: str, *, what: str, **kw: Any) -> M:
        r = await self.request(method, url, what=what, **kw)
        try:
            return model.model_validate(r.json())
        except (ValueError, ValidationError) as exc:
            raise APIStatusError(f"{what}: unexpected answer from the control plane ({type(exc).__name__}): "
                                 f"{self.scrub(r.text[:300])!r}", status_code=r.status_code) from None

    # ---- provisioning --------------------------------------------------------------------------
    async def create_session(self, *, training_project_id: str | None = None) -> SessionRecord:
        body = {"training_project_id": training_project_id} if training_project_id else None
        env = await self._json(SessionEnvelope, "POST", f"{self.root}/sessions", what="create session", json=body,
                               timeout=CREATE_TIMEOUT)
        return env.session

    async def create_trainer(self, body: dict[str, Any]) -> RunRecord:
        env = await self._json(RunEnvelope, "POST", f"{self.root}/trainers", what="create trainer", json=body,
                               timeout=CREATE_TIMEOUT)
        return env.run

    async def create_sampler(self, body: dict[str, Any]) -> SamplerRecord:
        env = await self._json(SamplerEnvelope, "POST", f"{self.root}/samplers", what="create sampler", json=body,
                               timeout=CREATE_TIMEOUT)
        return env.sampler

    async def trainer_status(self, deployment_id: str) -> str:
        env = await self._json(TrainerDeploymentEnvelope, "GET",
                               f"{self.base_url}/v1/loops/deployments/{quote(deployment_id, safe='')}",
                               what="trainer deployment status")
        return env.deployment.status.name

    async def sampler_status(self, model_id: str, deployment_id: str) -> str:
        dep = await self._json(SamplerDeployment, "GET", f"{self.base_url}/v1/models/{quote(model_id, safe='')}"
                               f"/deployments/{quote(deployment_id, safe='')}", what="sampler deployment status")
        return dep.status

    async def wake(self, sampler_base_url: str) -> None:
        """Wake a sampler that scaled to zero: ``POST <base without /sync>/wake`` (200 or 202)."""
        base = sampler_base_url.rstrip("/")
        base = base[: -len("/sync")] if base.endswith("/sync") else base
        await self.request("POST", f"{base}/wake", what="wake sampler")

    # ---- reads ---------------------------------------------------------------------------------
    async def capabilities(self) -> ServerCapabilities:
        return await self._json(ServerCapabilities, "GET", f"{self.base_url}/v1/loops/capabilities",
                                what="server capabilities")

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        env = await self._json(CheckpointList, "GET", f"{self.base_url}/v1/loops/checkpoints",
                               what="list checkpoints", params={"run_id": run_id})
        return env.checkpoints

    async def checkpoint_for_path(self, path: str) -> Checkpoint:
        """The checkpoint a ``bt://`` path names (the first entry the control plane lists for it)."""
        env = await self._json(CheckpointList, "GET", f"{self.base_url}/v1/loops/checkpoints",
                               what="resolve checkpoint path", params={"checkpoint_path": path})
        if not env.checkpoints:
            raise InvalidRequestError(f"no checkpoint at {path!r}", field="model_path")
        return env.checkpoints[0]

    async def checkpoint_files(self, checkpoint_id: str, page_size: int = 1000,
                               page_token: int = 0) -> CheckpointFilesResponse:
        """One page of presigned per-file URLs."""
        return await self._json(
            CheckpointFilesResponse, "GET",
            f"{self.base_url}/v1/loops/checkpoints/{quote(checkpoint_id, safe='')}/files",
            what="checkpoint files", params={"page_size": page_size, "page_token": page_token})

    async def all_checkpoint_files(self, checkpoint_id: str, page_size: int = 1000) -> list[CheckpointFile]:
        """Every file of a checkpoint: follows ``next_page_token`` to the last page."""
        files: list[CheckpointFile] = []
        token: int | None = 0
        while token is not None:
            page = await self.checkpoint_files(checkpoint_id, page_size, token)
            files += page.presigned_urls
            nxt = page.next_page_token
            if nxt is not None and nxt <= token:  # a token that does not advance would loop forever
                raise APIStatusError(f"checkpoint files: page token did not advance ({token} -> {nxt})",
                                     status_code=200)
            token = nxt
        return files

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _no_query(url: str) -> str:
    return url.split("?", 1)[0]


def _reason(r: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return r.json().get("details", {}).get("reason")
    return None
