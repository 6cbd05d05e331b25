"""The async client of the Baseten Loops control plane (sessions, trainers, samplers, checkpoints).

Every request carries ``Authorization: Api-Key <key>``, ``User-Agent: loops/<version>`` and
``X-Baseten-Accept-Error: 1`` (Baseten's proxies then say which layer rejected a request).

Retries differ from the data plane's (``loops_core.wire``): on the control plane a 503 means
"overloaded, try again", not "this replica is shutting down", so

* 429, 502, 503 and 504 are retried with capped exponential backoff, up to ``retries`` times;
* 500 is retried at most ``retries_500`` times (a blip, or a bug that retrying will not fix);
* connection failures are retried the same way (a POST only when the request never left);
* nothing else is retried: 4xx answers are final.

Errors are the public loops types: 401/403 is ``AuthenticationError`` naming ``BASETEN_API_KEY``,
an unreachable base URL is ``APIConnectionError`` naming ``LOOPS_BASE_URL``, 400/422 is
``InvalidRequestError``, 404 ``NotFoundError``; the rest go through ``loops_core.wire.raise_for_status``.
The API key never appears in a message: server texts are scrubbed of it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from loops_core import __version__
from loops_core.errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError,
                               DeploymentFailedError, InvalidRequestError, LoopsError)
from loops_core.types import Checkpoint, CheckpointFile, CheckpointFilesResponse, ServerCapabilities
from loops_core.wire import error_text, raise_for_status, ssl_context, translate_errors

from .models import (CheckpointList, RunEnvelope, RunRecord, SamplerDeployment, SamplerEnvelope, SamplerRecord,
                     SessionEnvelope, SessionRecord, TrainerDeploymentEnvelope)

log = logging.getLogger("loops.baseten")

__all__ = ["ControlPlane", "DeploymentFailedError", "RetryPolicy"]

ENV_API_KEY = "BASETEN_API_KEY"
ENV_BASE_URL = "LOOPS_BASE_URL"
DEFAULT_BASE_URL = "https://api.baseten.co"
TRANSIENT = frozenset({429, 502, 503, 504})
CREATE_TIMEOUT = 300.0  # session / trainer / sampler creation can wait on capacity
READ_TIMEOUT = 60.0

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6
    retries_500: int = 2
    backoff_s: float = 0.5
    backoff_cap_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_cap_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)


class ControlPlane:
    """One session's connection to ``{base_url}/v1/loops`` (the httpx client is made on first use,
    on the SDK loop)."""

    def __init__(self, base_url: str, api_key: str, *, retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.root = f"{self.base_url}/v1/loops"
        self._api_key = api_key
        self.retry = retry or RetryPolicy()
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
        """One call with the retry policy above; returns a 2xx response or raises a loops error."""
        attempt = fives = 0
        with self._scrubbed():
            while True:
                try:
                    with translate_errors(what, _no_query(url)):
                        r = await self.client().request(method, url, json=json, params=params,
                                                        timeout=timeout or httpx.USE_CLIENT_DEFAULT)
                except APIConnectionError as exc:
                    never_sent = isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout))
                    if attempt >= self.retry.retries or not (never_sent or method == "GET"):
                        raise self._unreachable(exc, what) from exc.__cause__
                    log.debug("%s: %s; retrying", what, type(exc.__cause__).__name__)
                else:
                    status = r.status_code
                    if status < 400:
                        return r
                    again = (status in TRANSIENT and attempt < self.retry.retries) or \
                            (status == 500 and fives < self.retry.retries_500)
                    if not again:
                        raise self._status_error(r, what, attempt + 1)
                    fives += status == 500
                    log.debug("%s: HTTP %s; retrying", what, status)
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1

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
        if status in TRANSIENT or status >= 500:
            return APIStatusError(f"{what}: the Baseten control plane answered HTTP {status} "
                                  f"({attempts} attempt{'s' * (attempts > 1)}); giving up: {text}",
                                  status_code=status, body=text)
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
