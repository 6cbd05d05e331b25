"""The Baseten backend: trainers and samplers provisioned by the Baseten Loops control plane.

The control plane (``LOOPS_BASE_URL``, default ``https://api.baseten.co``) says where the trainer
and sampler are; the clients are the same as on every backend. The trainer endpoint and its paired
sampler carry ``X-Run-Id: <run_id>``; a standalone sampler carries ``X-Sampler-Id`` instead (the
gateway rejects a request naming both). Each trainer gets a heartbeat while the session is open.

Settings (read when the ServiceClient is built, never at import):

* ``api_key=`` > ``BASETEN_API_KEY`` (required), ``base_url=`` > ``LOOPS_BASE_URL``;
* ``reuse_from_session_id=`` > ``LOOPS_REUSE_FROM_SESSION_ID`` (merged by the ServiceClient), and
  the option ``reuse_from_run_id`` > ``LOOPS_REUSE_FROM_RUN_ID``: reuse a warm trainer, best effort;
* options (``ServiceClient(backend="baseten", replicas=2, ...)``): ``availability_model``
  (> ``LOOPS_AVAILABILITY_MODEL``, ``dedicated`` or ``spot``), ``replicas``, ``sampler_replicas``,
  ``heartbeat_s`` (> ``LOOPS_HEARTBEAT_S``, default 60), ``ready_poll_s``, ``retries``,
  ``retry_backoff_s``, ``download_concurrency``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator

from loops_core.backend import CAPABILITIES, Backend, BackendConfig, SamplerHandle, TrainerHandle
from loops_core.checkpoints import parse_uri
from loops_core.errors import (APIStatusError, AuthenticationError, InvalidRequestError, NotFoundError)
from loops_core.futures import on_loop, run_sync
from loops_core.types import Checkpoint, CheckpointDownload, CheckpointFile, CheckpointFilesResponse, ServerCapabilities
from loops_core.wire import Endpoint, WireClient

from .control_plane import (DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, ControlPlane, DeploymentFailedError,
                            RetryPolicy)
from loops_core.download import download_files
from .models import RunRecord, SamplerRecord
from .readiness import HEARTBEAT_S, Heartbeat, wait_for_sampler, wait_for_trainer

log = logging.getLogger("loops.baseten")

OPTIONS = {"availability_model", "replicas", "sampler_replicas", "heartbeat_s", "ready_poll_s", "retries",
           "retry_backoff_s", "download_concurrency", "reuse_from_run_id"}


class BasetenBackend(Backend):
    name: ClassVar[str] = "baseten"
    # Exact version pinning and bit-determinism are not promised by the real service (its sampler
    # follows the live adapter once it reaches the floor); a control plane may add them per
    # session (the emulator does, see ``start_session``).
    capabilities: ClassVar[frozenset[str]] = frozenset({"checkpoints", "standalone_sampler", "tokenizer"})
    known_gaps: ClassVar[dict[str, str]] = {}

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        unknown = set(config.options) - OPTIONS
        if unknown:
            raise InvalidRequestError(f"unknown option(s) for the baseten backend: {', '.join(sorted(unknown))}; "
                                      f"known: {', '.join(sorted(OPTIONS))}", field=sorted(unknown)[0])
        api_key = config.api_key or os.environ.get(ENV_API_KEY) or None
        if not api_key:
            raise AuthenticationError(f"the baseten backend needs an API key: set {ENV_API_KEY} (or pass api_key=)")
        self._api_key = api_key
        self.base_url = (config.base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        opts = config.options
        self.availability_model = opts.get("availability_model") or os.environ.get("LOOPS_AVAILABILITY_MODEL") \
            or "dedicated"
        if self.availability_model not in ("dedicated", "spot"):
            raise InvalidRequestError(f"availability_model must be 'dedicated' or 'spot', got "
                                      f"{self.availability_model!r}", field="availability_model")
        self.replicas = _positive_int(opts.get("replicas", 1), "replicas")
        self.sampler_replicas = opts.get("sampler_replicas")
        self.heartbeat_s = float(opts.get("heartbeat_s") or os.environ.get("LOOPS_HEARTBEAT_S") or HEARTBEAT_S)
        self.ready_poll_s = opts.get("ready_poll_s")
        self.download_concurrency = _positive_int(opts.get("download_concurrency", 8), "download_concurrency")
        self.reuse_from_run_id = opts.get("reuse_from_run_id") or os.environ.get("LOOPS_REUSE_FROM_RUN_ID") or None
        retry = RetryPolicy(retries=int(opts.get("retries", 6)), backoff_s=float(opts.get("retry_backoff_s", 0.5)))
        self.control = ControlPlane(self.base_url, api_key, retry=retry)
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

    def _endpoint(self, url: str | None, what: str, **ids: str) -> Endpoint:
        if not url:
            raise APIStatusError(f"the control plane returned no URL for the {what} (it is not routable yet)",
                                 status_code=200)
        return Endpoint(url=url.rstrip("/"), headers={"X-Baseten-Accept-Error": "1", **ids}, api_key=self._api_key, api_key_env=ENV_API_KEY)

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
            record = await self.control.create_sampler(sampler_body)
            await wait_for_sampler(self.control, record, ready_timeout=ready_timeout, poll_s=self.ready_poll_s)
            sampler = self._endpoint(record.base_url, "paired sampler", **{"X-Run-Id": run.id})
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
        except APIStatusError as exc:  # NotFoundError included
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
        return SamplerHandle(sampler=self._endpoint(record.base_url, "sampler", **{"X-Sampler-Id": record.id}),
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


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", field=name)
    return value


def download_checkpoint(checkpoint_id: str, dest_dir: str | Path, *, api_key: str | None = None,
                        base_url: str | None = None) -> CheckpointDownload:
    """Download a checkpoint without a ServiceClient (blocking): ``BASETEN_API_KEY`` and
    ``LOOPS_BASE_URL`` apply as usual."""
    backend = BasetenBackend(BackendConfig(api_key=api_key, base_url=base_url))
    try:
        return backend.download_checkpoint_sync(checkpoint_id, dest_dir)
    finally:
        run_sync(backend.aclose())
