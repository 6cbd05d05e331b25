"""Tinker's ``TrainingClient`` over a ``loops_core.TrainingClient``.

Every operation returns an ``APIFuture`` at once and the operations run in call order (loops'
``seq_id`` ordering). Paths in responses are ``tinker://<run>/<weights|sampler_weights>/<name>``;
``tinker://`` and ``loops://`` paths are both accepted. Metrics keep Tinker's ``name:reduction`` keys.

Differences, by design: ``save_weights_and_get_sampling_client`` publishes to the trainer's paired
sampler under the name ``tinker-ephemeral`` (loops has no unnamed saves); ``save_weights_external``
returns the sampler checkpoint (a PEFT adapter directory, already Hugging Face format);
``optim_step`` takes ``AdamParams`` only; ``kind="inflight"``, ``LossHandle`` losses and
``age_encryption_recipients`` raise ``BadRequestError``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import loops_core
from loops_core.checkpoints import CheckpointStore, META

from ... import types
from ..._exceptions import BadRequestError, ConflictError, tinker_errors
from ..._runs import to_tinker_path, update_run
from .api_future import APIFuture, deprecated_async, run, settle
from .backcompat_sampling_client_future import BackcompatSamplingClientFuture
from .sampling_client import SamplingClient

if TYPE_CHECKING:  # pragma: no cover
    from .service_client import ServiceClient

EPHEMERAL = "tinker-ephemeral"
CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class TrainingClient:
    """One LoRA training run. ``model_id`` is the run id (the ``<run>`` of its ``tinker://`` paths)."""

    def __init__(self, client: loops_core.TrainingClient, *, service: "ServiceClient | None" = None):
        self._client = client
        self._service = service
        self.model_id: str = client.run_id or ""

    @property
    def loops_client(self) -> loops_core.TrainingClient:
        """The loops client underneath."""
        return self._client

    def get_console_url(self) -> str:
        return f"loops://{self.model_id}"

    # ---- forward / backward --------------------------------------------------------------------
    def forward(self, data: list[types.Datum], loss_fn: types.LossFnType,
                loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and per-token logprobs of ``data``; accumulated gradients are left alone."""
        return run(APIFuture, settle(self._client.forward_async(data, loss_fn, _config(loss_fn_config))))

    def forward_backward(self, data: list[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: Mapping[str, float | str] | None = None
                         ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward and backward; gradients accumulate until ``optim_step``."""
        return run(APIFuture, settle(self._client.forward_backward_async(data, loss_fn, _config(loss_fn_config))))

    def forward_backward_custom(self, data: list[types.Datum], loss_fn: CustomLossFn, *,
                                loss_type_input: str | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Train on ``loss_fn(data, logprobs) -> (loss, metrics)`` (torch on the client).

        The trainer sees only ``model_input``, ``target_tokens`` and ``weights``; ``loss_fn`` gets the
        full datums. ``loss:sum`` is the custom loss; the trainer's surrogate is ``surrogate_loss:sum``.
        """
        if loss_type_input is not None:
            warnings.warn("The 'loss_type_input' parameter of forward_backward_custom() is deprecated: the loss "
                          "always receives logprobs", DeprecationWarning, stacklevel=2)
        if not callable(loss_fn):
            raise BadRequestError("forward_backward_custom takes a callable loss; server-side LossHandle losses are "
                                  "not supported by loops backends", field="loss_fn")
        full = list(data)
        reduced = [types.Datum(model_input=d.model_input,
                               loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items()
                                               if k in ("target_tokens", "weights")}) for d in full]
        return run(APIFuture, settle(self._client.forward_backward_custom_async(
            reduced, lambda _sent, logprobs: loss_fn(full, logprobs))))

    # ---- optimizer and state ---------------------------------------------------------------------
    def optim_step(self, optim_params: types.OptimParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        """AdamW over the accumulated gradients (``tinker.types.AdamParams``: no clipping by default)."""
        if optim_params is not None and adam_params is not None:
            raise BadRequestError("Specify optim_params or legacy adam_params, not both", field="adam_params")
        params = optim_params if optim_params is not None else adam_params
        if isinstance(params, types.DimuonParams):
            raise BadRequestError("loops trainers run AdamW only; pass tinker.types.AdamParams", field="optim_params")
        if not isinstance(params, loops_core.AdamParams):
            raise BadRequestError(f"optim_step needs AdamParams, got {type(params).__name__}", field="optim_params")
        return run(APIFuture, settle(self._client.optim_step_async(params)))

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Weights and Adam state, as ``tinker://<run>/weights/<name>``."""
        self._check_new("weights", name, overwrite)

        async def go() -> types.SaveWeightsResponse:
            out = await settle(self._client.save_state_async(name, ttl_seconds))
            self._remember("weights", name, user_metadata)
            return out.model_copy(update={"path": to_tinker_path(out.path)})

        return run(APIFuture, go())

    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        """Deprecated (as in Tinker): use ``ServiceClient.create_training_client_from_state``."""
        _warn_load_state()
        return run(APIFuture, self._load(self._client.load_state_async(path)))

    def load_state_with_optimizer(self, path: str,
                                  weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        """Deprecated (as in Tinker): use ``create_training_client_from_state_with_optimizer``."""
        _warn_load_state()
        return run(APIFuture, self._load(self._client.load_state_with_optimizer_async(path)))

    async def _load(self, submitted: Any) -> types.LoadWeightsResponse:
        out = await settle(submitted)
        return out.model_copy(update={"path": to_tinker_path(out.path)})

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """A sampler checkpoint ``tinker://<run>/sampler_weights/<name>`` (also published to the paired sampler)."""
        async def go() -> types.SaveWeightsForSamplerResponse:
            out = await settle(self._client.save_weights_for_sampler_async(name, ttl_seconds))
            self._remember("sampler_weights", name, user_metadata)
            return out.model_copy(update={"path": to_tinker_path(out.path)})

        return run(APIFuture, go())

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None
                              ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """The adapter in Hugging Face (PEFT) format: loops' sampler checkpoints already are; the path
        is ``tinker://<run>/sampler_weights/<name>`` (download it with ``RestClient.get_external_weights_urls``)."""
        if age_encryption_recipients:
            raise BadRequestError("age_encryption_recipients is not supported by loops backends",
                                  field="age_encryption_recipients")

        async def go() -> types.SaveWeightsExternalResponse:
            out = await settle(self._client.save_weights_for_sampler_async(name, ttl_seconds))
            return types.SaveWeightsExternalResponse(path=to_tinker_path(out.path) or out.path)

        return run(APIFuture, go())

    # ---- sampling clients ------------------------------------------------------------------------
    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config: Any = None,
                                             record_stability_info: bool = False,
                                             kind: types.SamplingClientKind = "snapshot"
                                             ) -> BackcompatSamplingClientFuture:
        """A sampling client pinned to the current weights (published to the paired sampler)."""
        if name is not None:
            warnings.warn("save_weights_and_get_sampling_client(name=...) is deprecated and ignored",
                          FutureWarning, stacklevel=2)
        if kind != "snapshot":
            raise BadRequestError(f"kind={kind!r} is not supported by loops backends; use 'snapshot'", field="kind")

        async def go() -> SamplingClient:
            client = await settle(self._client.save_weights_and_get_sampling_client_async(EPHEMERAL))
            return SamplingClient(client, record_stability_info=record_stability_info)

        return run(BackcompatSamplingClientFuture, go())

    def create_sampling_client(self, model_path: str, retry_config: Any = None,
                               record_stability_info: bool = False) -> BackcompatSamplingClientFuture:
        """A sampling client on this run's sampler for the sampler checkpoint ``model_path``."""
        async def go() -> SamplingClient:
            client = await self._client.create_sampling_client_async(model_path)
            return SamplingClient(client, record_stability_info=record_stability_info)

        return run(BackcompatSamplingClientFuture, go())

    # ---- info ------------------------------------------------------------------------------------
    def get_info(self) -> types.GetInfoResponse:
        with tinker_errors():
            return self._client.get_info()

    async def get_info_async(self) -> types.GetInfoResponse:
        warnings.warn("DEPRECATED: TrainingClient.get_info_async() is deprecated (as in tinker 0.38); use "
                      "get_info()", FutureWarning, stacklevel=2)
        return self.get_info()

    def get_tokenizer(self) -> Any:
        with tinker_errors():
            return self._client.get_tokenizer()

    forward_async = deprecated_async(forward, returns_future=True)
    forward_backward_async = deprecated_async(forward_backward, returns_future=True)
    forward_backward_custom_async = deprecated_async(forward_backward_custom, returns_future=True)
    optim_step_async = deprecated_async(optim_step, returns_future=True)
    save_state_async = deprecated_async(save_state, returns_future=True)
    load_state_async = deprecated_async(load_state, returns_future=True)
    load_state_with_optimizer_async = deprecated_async(load_state_with_optimizer, returns_future=True)
    save_weights_for_sampler_async = deprecated_async(save_weights_for_sampler, returns_future=True)
    save_weights_external_async = deprecated_async(save_weights_external, returns_future=True)
    save_weights_and_get_sampling_client_async = deprecated_async(save_weights_and_get_sampling_client,
                                                                  returns_future=False)
    create_sampling_client_async = deprecated_async(create_sampling_client, returns_future=False)

    # ---- helpers -----------------------------------------------------------------------------------
    def _check_new(self, kind: str, name: str, overwrite: bool) -> None:
        # Only checkpoints in the local store can be seen from here (fake and local backends).
        if not overwrite and isinstance(name, str) and self.model_id and \
                (CheckpointStore().dir_for(self.model_id, kind, name) / META).is_file():
            raise ConflictError(f"checkpoint {kind}/{name} already exists in run {self.model_id}; pass "
                                "overwrite=True to replace it", status_code=409)

    def _remember(self, kind: str, name: str, user_metadata: dict[str, str] | None) -> None:
        if self.model_id:
            update_run(self.model_id, checkpoints={f"{kind}/{name}": user_metadata})

    def __repr__(self) -> str:
        return f"<tinker.TrainingClient over {self._client!r}>"


def _config(config: Mapping[str, float | str] | None) -> dict[str, Any] | None:
    return dict(config) if config is not None else None


def _warn_load_state() -> None:
    warnings.warn("DEPRECATED: TrainingClient.load_state*() is deprecated (as in tinker 0.38); use "
                  "ServiceClient.create_training_client_from_state*()", FutureWarning, stacklevel=3)
