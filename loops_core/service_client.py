"""ServiceClient: the session, and the factory of training and sampling clients.

The backend (``backend=`` > ``LOOPS_BACKEND`` > ``local``) decides where trainers and samplers run;
the clients it returns are the same classes on every backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .backend import Backend, BackendConfig, SamplerHandle, TrainerHandle, check_rank
from .direct import DirectBackend
from .errors import InvalidRequestError
from .futures import ClientLifecycle, on_loop, run_sync
from .plugins import load_backend, resolve_backend_name
from .sampling_client import SamplingClient
from .training_client import TrainingClient
from .types import (Checkpoint, CheckpointDownload, CheckpointFilesResponse, GetInfoResponse, ServerCapabilities,
                    WandbConfig)
from .wire import WireClient


class ServiceClient(ClientLifecycle):
    """Entry point of every session.

    Args:
        training_project_id: project to provision in (backends that have projects).
        api_key: credentials for a remote backend (default: its env var, e.g. ``BASETEN_API_KEY``).
        base_url: control-plane URL for a remote backend (default: e.g. ``LOOPS_BASE_URL``).
        reuse_from_session_id: reuse a prior session's trainer and sampler where the backend can
            (default: ``LOOPS_REUSE_FROM_SESSION_ID``; the keyword wins).
        backend: backend name; default ``LOOPS_BACKEND``, else ``local``.
        **options: backend-specific options (e.g. ``engine="hf"`` for ``local``).
    """

    def __init__(self, training_project_id: str | None = None, *, api_key: str | None = None,
                 base_url: str | None = None, reuse_from_session_id: str | None = None,
                 backend: str | Backend | None = None, **options: Any):
        config = BackendConfig(
            training_project_id=training_project_id, api_key=api_key, base_url=base_url,
            reuse_from_session_id=reuse_from_session_id or os.environ.get("LOOPS_REUSE_FROM_SESSION_ID") or None,
            options=options)
        if isinstance(backend, Backend):
            self._backend = backend
        else:
            self._backend = load_backend(resolve_backend_name(backend))(config)
        self._closed = False
        self._session_id = run_sync(self._backend.start_session())

    @classmethod
    def local(cls, *, trainer_url: str, sampler_url: str, api_key: str | None = None) -> "ServiceClient":
        """Bind to already-running trainer and sampler servers (no control plane)."""
        return cls(backend=DirectBackend(BackendConfig(api_key=api_key), trainer_url=trainer_url,
                                         sampler_url=sampler_url))

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def backend_name(self) -> str:
        return self._backend.name

    # ---- training clients ---------------------------------------------------------------------
    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    timeout: float = 600.0, ready_timeout: float = 3600.0,
                                    wandb_config: WandbConfig | None = None) -> TrainingClient:
        """Provision a trainer (and its paired sampler) for ``base_model`` with a fresh LoRA of ``rank``."""
        return run_sync(self._create_training(base_model, rank, seed, timeout, ready_timeout, wandb_config))

    async def create_lora_training_client_async(self, base_model: str, rank: int = 32, seed: int | None = None,
                                                timeout: float = 600.0, ready_timeout: float = 3600.0,
                                                wandb_config: WandbConfig | None = None) -> TrainingClient:
        """Async version of ``create_lora_training_client``."""
        return await on_loop(self._create_training(base_model, rank, seed, timeout, ready_timeout, wandb_config))

    async def _create_training(self, base_model: str, rank: int, seed: int | None, timeout: float,
                               ready_timeout: float, wandb_config: WandbConfig | None) -> TrainingClient:
        if not isinstance(base_model, str) or not base_model:
            raise InvalidRequestError("base_model must be a model name such as 'loops/tiny-qwen3'", field="base_model")
        check_rank(rank)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidRequestError(f"seed must be an integer or None, got {seed!r}", field="seed")
        handle: TrainerHandle = await self._backend.create_trainer(base_model, rank=rank, seed=seed,
                                                                   ready_timeout=ready_timeout)
        probe = WireClient(handle.trainer, timeout=timeout, ready_timeout=ready_timeout)
        try:
            info = GetInfoResponse.model_validate(await probe.get_json("/get_info", what="get_info"))
        finally:
            await probe.aclose()
        client = TrainingClient(handle.trainer, base_model=handle.base_model, lora_rank=rank, run_id=handle.run_id,
                                sampler=handle.sampler, info=info, timeout=timeout, ready_timeout=ready_timeout,
                                service=self, wandb_config=wandb_config)
        # A fresh adapter with this rank and seed, also when the trainer was reused.
        await (await client._init(rank, seed))
        return client

    # ---- sampling clients -------------------------------------------------------------------------
    def create_sampling_client(self, base_model: str | None = None, timeout: float = 300.0,
                               ready_timeout: float = 3600.0, model_path: str | None = None) -> SamplingClient:
        """A sampler for ``base_model`` (or for the sampler checkpoint ``model_path``)."""
        return run_sync(self._create_sampling(base_model, timeout, ready_timeout, model_path))

    async def create_sampling_client_async(self, base_model: str | None = None, timeout: float = 300.0,
                                           ready_timeout: float = 3600.0,
                                           model_path: str | None = None) -> SamplingClient:
        """Async version of ``create_sampling_client``."""
        return await on_loop(self._create_sampling(base_model, timeout, ready_timeout, model_path))

    async def _create_sampling(self, base_model: str | None, timeout: float, ready_timeout: float,
                               model_path: str | None) -> SamplingClient:
        if (base_model is None) == (model_path is None):
            raise InvalidRequestError("pass exactly one of base_model or model_path", field="base_model")
        handle: SamplerHandle = await self._backend.create_sampler(base_model, ready_timeout=ready_timeout,
                                                                   model_path=model_path)
        client = SamplingClient(handle.sampler, base_model=handle.base_model, timeout=timeout,
                                ready_timeout=ready_timeout, checkpoint_path=handle.checkpoint_path,
                                sampler_id=handle.sampler_id, tokenizer_loader=self._backend.load_tokenizer)
        await client._ensure_ready(ready_timeout)
        return client

    # ---- control-plane reads --------------------------------------------------------------------
    def get_server_capabilities(self) -> ServerCapabilities:
        """The base models this backend can provision, and on which GPU classes."""
        return run_sync(self._backend.get_server_capabilities())

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        """Async version of ``get_server_capabilities``."""
        return await on_loop(self._backend.get_server_capabilities())

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """Checkpoints saved by the run ``run_id``."""
        return run_sync(self._list_checkpoints(run_id))

    async def list_checkpoints_async(self, run_id: str) -> list[Checkpoint]:
        """Async version of ``list_checkpoints``."""
        return await on_loop(self._list_checkpoints(run_id))

    async def _list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        if not isinstance(run_id, str) or not run_id:
            raise InvalidRequestError("run_id must be a non-empty string", field="run_id")
        return await self._backend.list_checkpoints(run_id)

    def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                   page_token: int = 0) -> CheckpointFilesResponse:
        """URLs of every file in the checkpoint (checkpoints are directories, not archives)."""
        return run_sync(self._archive(checkpoint_id, page_size, page_token))

    async def get_checkpoint_archive_url_async(self, checkpoint_id: str, page_size: int = 1000,
                                               page_token: int = 0) -> CheckpointFilesResponse:
        """Async version of ``get_checkpoint_archive_url``."""
        return await on_loop(self._archive(checkpoint_id, page_size, page_token))

    async def _archive(self, checkpoint_id: str, page_size: int, page_token: int) -> CheckpointFilesResponse:
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidRequestError("checkpoint_id must be a non-empty string", field="checkpoint_id")
        return await self._backend.get_checkpoint_archive_url(checkpoint_id, page_size, page_token)

    def download_checkpoint(self, checkpoint_id: str, *, dest_dir: str | Path) -> CheckpointDownload:
        """Download every file of a checkpoint into ``dest_dir`` (which must be new or empty)."""
        return run_sync(self._download(checkpoint_id, dest_dir))

    async def download_checkpoint_async(self, checkpoint_id: str, *, dest_dir: str | Path) -> CheckpointDownload:
        """Async version of ``download_checkpoint``."""
        return await on_loop(self._download(checkpoint_id, dest_dir))

    async def _download(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidRequestError("checkpoint_id must be a non-empty string", field="checkpoint_id")
        return await self._backend.download_checkpoint(checkpoint_id, dest_dir)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what this session started (local servers, heartbeats)."""
        if not self._closed:
            self._closed = True
            run_sync(self._backend.aclose())

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await on_loop(self._backend.aclose())

    def __repr__(self) -> str:
        return f"<ServiceClient backend={self._backend.name} session={self._session_id}>"
