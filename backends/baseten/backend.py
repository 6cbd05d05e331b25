"""The Baseten backend: trainers and samplers provisioned by the Baseten Loops control plane.

The control plane (``LOOPS_BASE_URL``, default ``https://api.baseten.co``) says where the trainer
and sampler are; the clients are the same as on every backend. The trainer endpoint and its paired
sampler carry ``X-Run-Id: <run_id>``; a standalone sampler carries ``X-Sampler-Id`` instead (the
gateway rejects a request naming both). Each trainer gets a heartbeat while the session is open.

Settings: ``BasetenSettings`` below, read when the ServiceClient is built (never at import):
a keyword (``ServiceClient(backend="baseten", replicas=2, ...)``; ``api_key=`` and ``base_url=``
are the ServiceClient's own) > the environment > the default, validated (a bad value is a
``ConfigurationError`` naming it):

* ``api_key`` > ``BASETEN_API_KEY`` (required);
* ``base_url`` > ``LOOPS_BASE_URL`` (default ``https://api.baseten.co``);
* ``availability_model`` > ``LOOPS_AVAILABILITY_MODEL``: ``dedicated`` (default) or ``spot``;
* ``replicas`` > ``LOOPS_REPLICAS``: trainer replicas (default 1);
* ``sampler_replicas`` > ``LOOPS_SAMPLER_REPLICAS``: sampler replicas (default: the control plane's);
* ``heartbeat_s`` > ``LOOPS_HEARTBEAT_S``: seconds between trainer heartbeats (default 60);
* ``ready_poll_s`` > ``LOOPS_READY_POLL_S``: a fixed readiness poll interval (default: the
  ``READINESS`` policy's backoff for trainers, 2 s for samplers);
* ``retry_budget_s`` > ``LOOPS_RETRY_BUDGET_S``: seconds a control-plane call retries transient
  failures (default 60; 0: no retries);
* ``retry_backoff_s`` > ``LOOPS_RETRY_BACKOFF_S``: its first backoff wait (default 0.5, capped at 16x);
* ``download_concurrency`` > ``LOOPS_DOWNLOAD_CONCURRENCY``: parallel checkpoint file downloads (default 8);
* ``reuse_from_run_id`` > ``LOOPS_REUSE_FROM_RUN_ID``: reuse that run's warm trainer, best effort;
  ``reuse_from_session_id=`` > ``LOOPS_REUSE_FROM_SESSION_ID`` (merged by the ServiceClient) does
  the same for a session (the run form wins).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from loops_core.backend import CAPABILITIES, Backend, BackendConfig, SamplerHandle, TrainerHandle
from loops_core.checkpoints import parse_uri
from loops_core.errors import (APIStatusError, AuthenticationError, InvalidRequestError, NotFoundError)
from loops_core.futures import on_loop, run_sync
from loops_core.settings import load_settings
from loops_core.types import Checkpoint, CheckpointDownload, CheckpointFile, CheckpointFilesResponse, ServerCapabilities
from loops_core.wire import Endpoint, WireClient, once

from .control_plane import (DEFAULT_BASE_URL, DEFAULT_RETRY_BUDGET_S, ENV_API_KEY, ENV_BASE_URL, ControlPlane,
                            DeploymentFailedError, control_plane_policy)
from loops_core.download import download_files
from .models import RunRecord, SamplerRecord
from .readiness import HEARTBEAT_S, Heartbeat, wait_for_sampler, wait_for_trainer

log = logging.getLogger("loops.baseten")



class BasetenSettings(BaseSettings):
    """Options of the baseten backend: keyword > environment (``LOOPS_*``; the key ``BASETEN_API_KEY``) > default."""

    model_config = SettingsConfigDict(env_prefix="LOOPS_", extra="forbid", populate_by_name=True,
                                      env_ignore_empty=True)

    api_key: SecretStr | None = Field(None, validation_alias=ENV_API_KEY, description=(
        "Baseten API key, sent as Authorization: Api-Key (required)"))
    base_url: str = Field(DEFAULT_BASE_URL, min_length=1, description="the Baseten control plane's URL")
    availability_model: Literal["dedicated", "spot"] = Field("dedicated", description=(
        "dedicated capacity, or cheaper spot capacity that may be preempted"))
    replicas: int = Field(1, ge=1, description="trainer replicas")
    sampler_replicas: int | None = Field(None, ge=1, description=(
        "sampler replicas (num_replicas); None: the control plane's default"))
    heartbeat_s: float = Field(HEARTBEAT_S, gt=0, description=(
        "seconds between heartbeats that keep an idle trainer from scaling down"))
    ready_poll_s: float | None = Field(None, gt=0, description=(
        "a fixed readiness poll interval; None: the READINESS policy's backoff (trainers), 2 s (samplers)"))
    retry_budget_s: float = Field(DEFAULT_RETRY_BUDGET_S, ge=0, description=(
        "seconds a control-plane call retries 429/502/503/504 and connection errors; 0: no retries"))
    retry_backoff_s: float = Field(0.5, gt=0, description=(
        "first backoff wait of a control-plane retry; doubles with jitter, capped at 16x"))
    download_concurrency: int = Field(8, ge=1, description="checkpoint files downloaded in parallel")
    reuse_from_run_id: str | None = Field(None, description=(
        "reuse this run's warm trainer for the session's first trainer (best effort)"))


class BasetenBackend(Backend):
    name: ClassVar[str] = "baseten"
    # Exact version pinning and bit-determinism are not promised by the real service (its sampler
    # follows the live adapter once it reaches the floor); a control plane may add them per
    # session (the emulator does, see ``start_session``).
    capabilities: ClassVar[frozenset[str]] = frozenset({"checkpoints", "standalone_sampler", "tokenizer"})
    known_gaps: ClassVar[dict[str, str]] = {}

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.settings: BasetenSettings = load_settings(  # type: ignore[assignment]
            BasetenSettings, **{**config.options, "api_key": config.api_key or None,
                                "base_url": config.base_url or None})
        st = self.settings
        if st.api_key is None or not st.api_key.get_secret_value():
            raise AuthenticationError(f"the baseten backend needs an API key: set {ENV_API_KEY} (or pass api_key=)")
        self._api_key = api_key = st.api_key.get_secret_value()
        self.base_url = st.base_url.rstrip("/")
        self.availability_model = st.availability_model
        self.replicas = st.replicas
        self.sampler_replicas = st.sampler_replicas
        self.heartbeat_s = st.heartbeat_s
        self.ready_poll_s = st.ready_poll_s
        self.download_concurrency = st.download_concurrency
        self.reuse_from_run_id = st.reuse_from_run_id
        self.control = ControlPlane(self.base_url, api_key, policy=control_plane_policy(st.retry_backoff_s),
                                    retry_budget_s=st.retry_budget_s)
        self.session_id: str | None = None
        self.heartbeats: list[Heartbeat] = []
        self._reuse_pending = True  # only the first trainer of a session reuses a warm one

    def __repr__(self) -> str:
        return f"<BasetenBackend base_url={self.base_url!r} session={self.session_id!r}>"

    # ---- session and provisioning ----------------------------------------------------------------
    async def start_session(self) -> str:
        session = await self.control.create_session(training_project_id=self.config.training_project_id)
        self.session_id = session.id
        extra = frozenset(session.features) & CAPABILITIES
        if extra - self.capabilities:
            self.capabilities = self.capabilities | extra  # type: ignore[misc]  (per-instance)
        return session.id

    def _endpoint(self, url: str | None, what: str, *, queued: bool = False, ready: Any = None,
                  **ids: str) -> Endpoint:
        """``queued``: a serverless sampler (no deployment of its own): /sample answers 202 and an operation."""
        if not url:
            raise APIStatusError(f"the control plane returned no URL for the {what} (it is not routable yet)",
                                 status_code=200)
        return Endpoint(url=url.rstrip("/"), headers={"X-Baseten-Accept-Error": "1", **ids}, api_key=self._api_key,
                        api_key_env=ENV_API_KEY, queued=queued, ready=ready)

    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        body: dict[str, Any] = {"session_id": self._session(), "base_model": base_model, "lora_rank": rank,
                                "replicas": self.replicas, "availability_model": self.availability_model}
        for key, value in (("seed", seed), ("max_seq_len", max_seq_len),
                           ("training_project_id", self.config.training_project_id)):
            if value is not None:
                body[key] = value
        reuse = self._reuse_fields()
        run = await self._provision(body, reuse)
        try:
            trainer, wire = await self._wait_for_trainer(run, base_model, ready_timeout)
        except DeploymentFailedError as exc:
            if not reuse:
                raise
            log.info("the reused trainer for run %s is %s; provisioning a fresh one", run.id, exc.status)
            run = await self._provision(body, {})
            trainer, wire = await self._wait_for_trainer(run, base_model, ready_timeout)
        sampler_body: dict[str, Any] = {"session_id": self._session(), "run_id": run.id}
        if self.sampler_replicas is not None:
            sampler_body["num_replicas"] = self.sampler_replicas
        try:
            # Provisioned with the trainer, as the seed says, but waited for only when first used (a
            # publish or a sample): a run that only trains never waits on a sampler's cold start.
            record = await self.control.create_sampler(sampler_body)
            ready = once(lambda: wait_for_sampler(self.control, record, ready_timeout=ready_timeout,
                                                  poll_s=self.ready_poll_s))
            if not record.base_url:  # not routable yet: nothing to point a client at before it is
                await ready()
            sampler = self._endpoint(record.base_url, "paired sampler", queued=not record.dedicated, ready=ready,
                                     **{"X-Run-Id": run.id})
        except BaseException:
            await wire.aclose()
            raise
        beat = Heartbeat(wire, base_model=base_model, run_id=run.id, interval=self.heartbeat_s)
        beat.start()
        self.heartbeats.append(beat)
        return TrainerHandle(trainer=trainer, sampler=sampler, run_id=run.id, base_model=run.base_model or base_model,
                             sampler_id=record.id, max_seq_len=max_seq_len)

    async def _wait_for_trainer(self, run: RunRecord, base_model: str,
                                ready_timeout: float) -> tuple[Endpoint, WireClient]:
        """The trainer's endpoint once it is healthy, and the client that probed it (kept for the heartbeat)."""
        trainer = self._endpoint(run.base_url, "trainer", **{"X-Run-Id": run.id})
        wire = WireClient(trainer, timeout=30.0, ready_timeout=0.0)
        try:
            await wait_for_trainer(self.control, run, wire, base_model, ready_timeout=ready_timeout,
                                   poll_s=self.ready_poll_s)
        except BaseException:
            await wire.aclose()
            raise
        return trainer, wire

    def _reuse_fields(self) -> dict[str, str]:
        if not self._reuse_pending:
            return {}
        self._reuse_pending = False
        if self.reuse_from_run_id:  # the run form wins, as in the published client
            return {"reuse_from_run_id": self.reuse_from_run_id}
        if self.config.reuse_from_session_id:
            return {"reuse_from_session_id": self.config.reuse_from_session_id}
        return {}

    async def _provision(self, body: dict[str, Any], reuse: dict[str, str]) -> RunRecord:
        if not reuse:
            return await self.control.create_trainer(body)
        try:
            return await self.control.create_trainer({**body, **reuse})
        except (APIStatusError, InvalidRequestError) as exc:  # NotFoundError included; a 409 is an InvalidRequestError
            if exc.status_code not in (404, 409, 410):
                raise
            log.info("cannot reuse %s (%s); provisioning a fresh trainer", reuse, exc)
            return await self.control.create_trainer(body)

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        body: dict[str, Any] = {"session_id": self._session(), "availability_model": self.availability_model}
        if model_path is not None:
            checkpoint = await self.control.checkpoint_for_path(model_path)
            base_model = checkpoint.base_model
            body["model_path"] = model_path
        else:
            body["base_model"] = base_model
        if self.sampler_replicas is not None:
            body["num_replicas"] = self.sampler_replicas
        if self.config.reuse_from_session_id:
            body["reuse_from_session_id"] = self.config.reuse_from_session_id
        record: SamplerRecord = await self.control.create_sampler(body)
        await wait_for_sampler(self.control, record, ready_timeout=ready_timeout, poll_s=self.ready_poll_s)
        base_model = record.base_model or base_model
        if not base_model:
            raise InvalidRequestError(f"{model_path!r} does not record its base model", field="model_path")
        return SamplerHandle(sampler=self._endpoint(record.base_url, "sampler", queued=not record.dedicated,
                                                    **{"X-Sampler-Id": record.id}),
                             base_model=base_model, sampler_id=record.id, checkpoint_path=model_path)

    def _session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("start_session() must run before provisioning")
        return self.session_id

    # ---- reads -------------------------------------------------------------------------------------
    async def get_server_capabilities(self) -> ServerCapabilities:
        return await self.control.capabilities()

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        return await self.control.list_checkpoints(run_id)

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        return await self.control.checkpoint_files(await self._checkpoint_id(checkpoint_id), page_size, page_token)

    async def _checkpoint_id(self, value: str) -> str:
        """A checkpoint id; a ``bt://loops:<run>/...`` (or ``loops://``) path is resolved by the control plane."""
        if not isinstance(value, str) or not value:
            raise InvalidRequestError("checkpoint_id must be a non-empty string", field="checkpoint_id")
        if parse_uri(value) is None:
            return value
        return (await self.control.checkpoint_for_path(value)).id

    async def list_checkpoint_files(self, checkpoint_id: str, page_size: int = 1000) -> list[CheckpointFile]:
        """Every file of a checkpoint (all pages)."""
        async def run() -> list[CheckpointFile]:
            return await self.control.all_checkpoint_files(await self._checkpoint_id(checkpoint_id), page_size)

        return await on_loop(run())

    async def download_checkpoint(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        """Download every file of a checkpoint (an id or a ``bt://loops:``/``loops://`` path) into
        ``dest_dir``, which must be new or empty."""
        async def run() -> CheckpointDownload:
            files = await self.control.all_checkpoint_files(await self._checkpoint_id(checkpoint_id))
            if not files:
                raise NotFoundError(f"checkpoint {checkpoint_id!r} has no files", status_code=404)
            return await download_files(files, dest_dir, concurrency=self.download_concurrency)

        return await on_loop(run())

    def download_checkpoint_sync(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        """Blocking version of ``download_checkpoint``."""
        return run_sync(self.download_checkpoint(checkpoint_id, dest_dir))

    async def release_trainer(self, run_id: str) -> None:
        """Stop the heartbeat of a trainer whose TrainingClient closed, so it may scale down."""
        mine = [b for b in self.heartbeats if b.run_id == run_id]
        self.heartbeats = [b for b in self.heartbeats if b.run_id != run_id]
        for beat in mine:
            await beat.stop()

    async def aclose(self) -> None:
        beats, self.heartbeats = self.heartbeats, []
        for beat in beats:
            await beat.stop()
        await self.control.aclose()

    # ---- the contract suite's environment ---------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def contract_environment(cls) -> Iterator[None]:
        """An emulator (fake engine) on a free loopback port, with ``LOOPS_BASE_URL`` and
        ``BASETEN_API_KEY`` pointing at it; both are restored afterwards."""
        from .emulator import Emulator

        key = "contract-emulator-key"
        with Emulator(api_key=key, engine="fake").running() as emu:
            saved = {k: os.environ.get(k) for k in (ENV_BASE_URL, ENV_API_KEY)}
            os.environ[ENV_BASE_URL], os.environ[ENV_API_KEY] = emu.url, key
            try:
                yield
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def download_checkpoint(checkpoint_id: str, dest_dir: str | Path, *, api_key: str | None = None,
                        base_url: str | None = None) -> CheckpointDownload:
    """Download a checkpoint without a ServiceClient (blocking): ``BASETEN_API_KEY`` and
    ``LOOPS_BASE_URL`` apply as usual."""
    backend = BasetenBackend(BackendConfig(api_key=api_key, base_url=base_url))
    try:
        return backend.download_checkpoint_sync(checkpoint_id, dest_dir)
    finally:
        run_sync(backend.aclose())
