"""ServiceClient: the session, and the factory of training and sampling clients.

The backend (``backend=`` > ``LOOPS_BACKEND`` > ``local``) decides where trainers and samplers run;
the clients it returns are the same classes on every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backend import Backend, BackendConfig, SamplerHandle, TrainerHandle, check_rank
from .direct import DirectBackend
from .errors import InvalidRequestError
from .futures import ClientLifecycle, on_loop, run_sync, twin
from .plugins import load_backend
from .progress import status
from .sampling_client import SamplingClient
from .session import Session
from .settings import client_settings
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
        settings = client_settings(reuse_from_session_id=reuse_from_session_id,
                                   backend=backend if isinstance(backend, str) else None)
        config = BackendConfig(training_project_id=training_project_id, api_key=api_key, base_url=base_url,
                               reuse_from_session_id=settings.reuse_from_session_id, options=options)
        chosen = backend if isinstance(backend, Backend) else load_backend(settings.backend)(config)
        self._session = Session(chosen)
        self._session_id = run_sync(chosen.start_session())

    @classmethod
    def local(cls, *, trainer_url: str, sampler_url: str, api_key: str | None = None) -> "ServiceClient":
        """Bind to already-running trainer and sampler servers (no control plane). The API key
        defaults to ``LOOPS_API_KEY``."""
        key = api_key or (s.get_secret_value() if (s := client_settings().api_key) else None)
        return cls(backend=DirectBackend(BackendConfig(api_key=key), trainer_url=trainer_url,
                                         sampler_url=sampler_url))

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def backend(self) -> Backend:
        """The backend this session provisions on (its ``name``, ``capabilities``, ...)."""
        return self._session.backend

    @property
    def backend_name(self) -> str:
        return self._session.backend.name

    # ---- training clients ---------------------------------------------------------------------
    @twin
    async def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                          timeout: float = 600.0, ready_timeout: float = 3600.0,
                                          wandb_config: WandbConfig | None = None) -> TrainingClient:
        """Provision a trainer (and its paired sampler) for ``base_model`` with a fresh LoRA of ``rank``."""
        self._session.check_open("create_lora_training_client")
        if not isinstance(base_model, str) or not base_model:
            raise InvalidRequestError("base_model must be a model name such as 'loops/tiny-qwen3'", field="base_model")
        check_rank(rank)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidRequestError(f"seed must be an integer or None, got {seed!r}", field="seed")
        async with status(f"provisioning a trainer for {base_model} on {self.backend_name}"):
            handle: TrainerHandle = await self._session.backend.create_trainer(base_model, rank=rank, seed=seed,
                                                                               ready_timeout=ready_timeout)
        probe = WireClient(handle.trainer, timeout=timeout, ready_timeout=ready_timeout)
        try:
            info = GetInfoResponse.model_validate(await probe.get_json("/get_info", what="get_info"))
        finally:
            await probe.aclose()
        client = TrainingClient(handle.trainer, base_model=handle.base_model, lora_rank=rank, run_id=handle.run_id,
                                sampler=handle.sampler, info=info, timeout=timeout, ready_timeout=ready_timeout,
                                session=self._session, wandb_config=wandb_config)
        # A fresh adapter with this rank and seed, also when the trainer was reused.
        await (await client.init_trainer_server_async(rank, seed))
        return client

    @twin
    async def create_training_client_from_state(self, path: str, base_model: str | None = None, rank: int = 32,
                                                with_optimizer: bool = False) -> TrainingClient:
        """A new training client whose adapter (and, ``with_optimizer``, Adam state) is loaded from
        the ``save_state`` checkpoint at ``path``. ``base_model`` defaults to the checkpoint's."""
        client = await self.create_lora_training_client_async(base_model or await self._checkpoint_base(path), rank)
        load = client.load_state_with_optimizer_async if with_optimizer else client.load_state_async
        await (await load(path))
        return client

    async def _checkpoint_base(self, path: str) -> str:
        for model in (await self._session.backend.get_server_capabilities()).supported_models:
            return model.model_name
        raise InvalidRequestError("pass base_model: this backend does not say which models it serves",
                                  field="base_model")

    # ---- sampling clients -------------------------------------------------------------------------
    @twin
    async def create_sampling_client(self, base_model: str | None = None, timeout: float = 300.0,
                                     ready_timeout: float = 3600.0, model_path: str | None = None) -> SamplingClient:
        """A sampler for ``base_model`` (or for the sampler checkpoint ``model_path``)."""
        self._session.check_open("create_sampling_client")
        if (base_model is None) == (model_path is None):
            raise InvalidRequestError("pass exactly one of base_model or model_path", field="base_model")
        async with status(f"provisioning a sampler for {base_model or model_path} on {self.backend_name}"):
            handle: SamplerHandle = await self._session.backend.create_sampler(
                base_model, ready_timeout=ready_timeout, model_path=model_path)
        client = SamplingClient(handle.sampler, base_model=handle.base_model, timeout=timeout,
                                ready_timeout=ready_timeout, checkpoint_path=handle.checkpoint_path,
                                sampler_id=handle.sampler_id, tokenizer_loader=self._session.load_tokenizer)
        await client.ensure_ready_async(ready_timeout)
        return client

    # ---- control-plane reads --------------------------------------------------------------------
    @twin
    async def get_server_capabilities(self) -> ServerCapabilities:
        """The base models this backend can provision, and on which GPU classes."""
        return await self._session.backend.get_server_capabilities()

    @twin
    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """Checkpoints saved by the run ``run_id``."""
        return await self._session.list_checkpoints(run_id)

    @twin
    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        """URLs of every file in the checkpoint (checkpoints are directories, not archives)."""
        return await self._session.checkpoint_archive_url(checkpoint_id, page_size, page_token)

    @twin
    async def download_checkpoint(self, checkpoint_id: str, *, dest_dir: str | Path) -> CheckpointDownload:
        """Download every file of a checkpoint into ``dest_dir`` (which must be new or empty)."""
        return await self._session.download_checkpoint(checkpoint_id, dest_dir)

    @twin
    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        """Delete a checkpoint (``<run>/weights/<name>`` or ``<run>/sampler_weights/<name>``)."""
        await self._session.delete_checkpoint(checkpoint_id)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what this session started (local servers, heartbeats). Clients made from it raise
        ``ClientClosedError`` afterwards."""
        run_sync(self._session.aclose())

    async def aclose(self) -> None:
        await on_loop(self._session.aclose())

    def __repr__(self) -> str:
        return f"<ServiceClient backend={self.backend_name} session={self._session_id}>"
