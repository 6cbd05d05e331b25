"""Tinker's ``ServiceClient`` over a ``loops_core.ServiceClient``.

The backend comes from ``LOOPS_BACKEND`` (fake, local, modal, baseten), never from Tinker's
``base_url`` / ``api_key``, which are accepted with a warning. Unknown keyword arguments are
ignored with a FutureWarning, as in Tinker. Client factories return futures of clients
(``BackcompatTrainingClientFuture`` / ``BackcompatSamplingClientFuture``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Mapping

import loops_core
from loops_core.checkpoints import parse_uri
from loops_core.errors import InvalidRequestError, NotFoundError

from ... import types
from ..._exceptions import bad_request, tinker_errors
from ..._runs import update_run
from .api_future import APIFuture, AwaitableConcurrentFuture, deprecated_async, run, settle, unsupported  # noqa: F401
from .custom_loss import LossHandle, PerDatumLossFn  # noqa: F401 (Tinker's import path)
from .backcompat_sampling_client_future import BackcompatSamplingClientFuture
from .backcompat_training_client_future import BackcompatTrainingClientFuture
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .training_client import TrainingClient


class ServiceClient:
    """A session on the loops backend named by ``LOOPS_BACKEND``. A context manager."""

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, *,
                 display_name: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 default_headers_overrides: Mapping[str, str] | None = None, **kwargs: Any):
        if kwargs:
            warnings.warn(f"ServiceClient ignores the unknown keyword arguments {sorted(kwargs)}", FutureWarning,
                          stacklevel=2)
        if base_url is not None or api_key is not None or default_headers_overrides:
            warnings.warn("tinker (loops shim): base_url, api_key and default_headers_overrides are ignored; the "
                          "backend comes from LOOPS_BACKEND (fake, local, modal, baseten) and its own settings",
                          UserWarning, stacklevel=2)
        self.user_metadata = dict(user_metadata) if user_metadata else None
        self.display_name = display_name
        with tinker_errors():
            self._client = loops_core.ServiceClient(project_id or os.environ.get("TINKER_PROJECT_ID") or None)

    @property
    def holder(self) -> loops_core.ServiceClient:
        """What Tinker's clients hang off: here, the loops session underneath."""
        return self._client

    def get_console_url(self) -> str:
        """loops has no web console: the session as ``loops://<backend>/sessions/<id>``."""
        return f"loops://{self._client.backend_name}/sessions/{self._client.session_id}"

    def get_telemetry(self) -> None:
        """loops sends no telemetry."""
        return None

    def create_custom_loss(self, fn: Any, input_ranks: Mapping[str, int]) -> Any:
        """Server-side traced losses: not in loops; pass the callable to ``forward_backward_custom`` instead."""
        raise unsupported("ServiceClient.create_custom_loss", "loops trainers run no uploaded loss graphs; pass the "
                          "loss callable to TrainingClient.forward_backward_custom (it runs on the client)")

    def copy_weights(self, path: str, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> Any:
        """Copying checkpoints between Tinker projects: loops has no projects."""
        raise unsupported("ServiceClient.copy_weights", "loops has no projects to copy checkpoints between")

    # ---- training clients --------------------------------------------------------------------
    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    optimizer: types.OptimizerConfig | None = None) -> BackcompatTrainingClientFuture:
        """A fresh LoRA of ``rank`` on ``base_model``.

        loops adapts attention and MLP layers together and never the unembedding: ``train_attn`` and
        ``train_mlp`` must stay True (anything else raises ``BadRequestError``); ``train_unembed`` is
        accepted and has no effect (the run's record says ``train_unembed: false``).
        """
        if not (train_mlp or train_attn or train_unembed):
            raise bad_request("At least one of train_mlp, train_attn, or train_unembed must be True", "train_mlp")
        if not (train_mlp and train_attn):
            raise bad_request("loops backends adapt attention and MLP layers together: train_attn=False or "
                              "train_mlp=False is not supported", "train_attn" if not train_attn else "train_mlp")
        _check_optimizer(optimizer)

        async def go() -> TrainingClient:
            client = await self._client.create_lora_training_client_async(base_model, rank, seed)
            self._record(client, user_metadata)
            return TrainingClient(client, service=self)

        return run(BackcompatTrainingClientFuture, go())

    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None,
                                          optimizer: types.OptimizerConfig | None = None
                                          ) -> BackcompatTrainingClientFuture:
        """A new run starting from the weights of ``tinker://<run>/weights/<name>`` (fresh optimizer)."""
        _check_optimizer(optimizer)
        return run(BackcompatTrainingClientFuture, self._from_state(path, base_model, user_metadata, False))

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata: dict[str, str] | None = None,
                                                         weights_access_token: str | None = None
                                                         ) -> BackcompatTrainingClientFuture:
        """A new run resuming weights and Adam state from ``tinker://<run>/weights/<name>``."""
        return run(BackcompatTrainingClientFuture, self._from_state(path, base_model, user_metadata, True))

    async def _from_state(self, path: str, base_model: str | None, user_metadata: dict[str, str] | None,
                          with_optimizer: bool) -> TrainingClient:
        parsed = parse_uri(path) if isinstance(path, str) else None
        if parsed is None:
            raise InvalidRequestError(f"path {path!r} is not a checkpoint path such as tinker://<run>/weights/<name>",
                                      field="path")
        run_id, kind, name = parsed
        if kind != "weights":
            raise InvalidRequestError(f"{path!r} is a sampler checkpoint; training resumes from a weights "
                                      "checkpoint (save_state returns one)", field="path")
        try:
            found = await self._client.list_checkpoints_async(run_id)
        except NotImplementedError:
            raise InvalidRequestError(f"the {self._client.backend_name!r} backend cannot list checkpoints, so "
                                      "it cannot resume from a path", field="path") from None
        ckpt = next((c for c in found if c.checkpoint_type == "training" and c.checkpoint_id == name), None)
        if ckpt is None:
            raise NotFoundError(f"checkpoint {path!r} not found", status_code=404)
        base = base_model or ckpt.base_model
        if not base:
            raise InvalidRequestError(f"checkpoint {path!r} does not name its base model; pass base_model",
                                      field="base_model")
        rank = ckpt.lora_adapter_config.r if ckpt.lora_adapter_config else 32
        client = await self._client.create_lora_training_client_async(base, rank)
        load = client.load_state_with_optimizer_async if with_optimizer else client.load_state_async
        await settle(load(path))
        self._record(client, user_metadata, resumed_from=path)
        return TrainingClient(client, service=self)

    def _record(self, client: loops_core.TrainingClient, user_metadata: dict[str, str] | None,
                **extra: Any) -> None:
        if not client.run_id:
            return
        info = client.get_info()
        merged = {**(self.user_metadata or {}), **(user_metadata or {})} or None
        update_run(client.run_id, base_model=info.model_name, lora_rank=info.lora_rank, is_lora=True,
                   train_attn=True, train_mlp=True, train_unembed=False, user_metadata=merged,
                   backend=self._client.backend_name, session_id=self._client.session_id,
                   display_name=self.display_name, **extra)

    # ---- sampling clients ----------------------------------------------------------------------
    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config: Any = None,
                               record_stability_info: bool = False) -> BackcompatSamplingClientFuture:
        """A sampler for the sampler checkpoint ``model_path`` (``tinker://.../sampler_weights/...``) or for
        ``base_model``."""
        if model_path is None and base_model is None:
            raise bad_request("pass model_path or base_model", "model_path")

        async def go() -> SamplingClient:
            client = await self._client.create_sampling_client_async(
                base_model=None if model_path is not None else base_model, model_path=model_path)
            return SamplingClient(client, record_stability_info=record_stability_info)

        return run(BackcompatSamplingClientFuture, go())

    create_lora_training_client_async = deprecated_async(create_lora_training_client, returns_future=False)
    create_training_client_from_state_async = deprecated_async(create_training_client_from_state,
                                                               returns_future=False)
    create_training_client_from_state_with_optimizer_async = deprecated_async(
        create_training_client_from_state_with_optimizer, returns_future=False)
    create_sampling_client_async = deprecated_async(create_sampling_client, returns_future=False)

    # ---- REST ------------------------------------------------------------------------------------
    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """Deprecated (as in Tinker): use ``tinker.RestClient().get_server_capabilities()``."""
        warnings.warn("DEPRECATED: ServiceClient.get_server_capabilities() is deprecated; use "
                      "tinker.RestClient().get_server_capabilities()", FutureWarning, stacklevel=2)
        return RestClient(self).get_server_capabilities().result()

    def get_server_capabilities_async(self) -> Any:
        """Deprecated (as in Tinker): use ``await tinker.RestClient().get_server_capabilities()``."""
        warnings.warn("DEPRECATED: ServiceClient.get_server_capabilities_async() is deprecated; use "
                      "`await tinker.RestClient().get_server_capabilities()`", FutureWarning, stacklevel=2)
        return RestClient(self).get_server_capabilities().result_async()

    def create_rest_client(self) -> RestClient:
        """Deprecated (as in Tinker): construct ``tinker.RestClient()`` directly."""
        warnings.warn("DEPRECATED: ServiceClient.create_rest_client() is deprecated; construct tinker.RestClient() "
                      "directly", FutureWarning, stacklevel=2)
        return RestClient(self)

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self, status: Literal["success", "errored", "interrupted"],
              detail: str | None = None) -> APIFuture[None]:
        """End the session and stop what the backend started for it (local servers, ...)."""
        return run(APIFuture, self._client.aclose())

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        status = "success" if exc_type is None else ("interrupted" if exc_type is KeyboardInterrupt else "errored")
        self.close(status).result()

    def __repr__(self) -> str:
        return f"<tinker.ServiceClient over {self._client!r}>"


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, types.AdamOptimizerConfig):
        raise bad_request("loops trainers run AdamW only: optimizer must be None or AdamOptimizerConfig()",
                          "optimizer")
