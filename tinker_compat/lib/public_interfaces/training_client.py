"""Tinker's ``TrainingClient`` over a ``loops_core.TrainingClient``.

Every operation returns an ``APIFuture`` at once and the operations run in call order (loops'
``seq_id`` ordering). Paths in responses are ``tinker://<run>/<weights|sampler_weights>/<name>``;
``tinker://`` and ``loops://`` paths are both accepted. Metrics keep Tinker's ``name:reduction`` keys.

Differences, by design: ``save_weights_and_get_sampling_client`` publishes to the trainer's paired
sampler under the name ``tinker-ephemeral`` (loops has no unnamed saves); ``save_weights_external``
returns the sampler checkpoint (a PEFT adapter directory, already Hugging Face format);
``optim_step`` takes ``AdamParams`` only; ``kind="inflight"``, ``LossHandle`` losses and
``age_encryption_recipients`` raise ``BadRequestError``. Data goes to loops and results come back
through ``tinker._convert``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import loops_core
from ... import _convert as convert
from ... import types
from ..._exceptions import bad_request, status_error, tinker_errors
from ..._runs import update_run
from .api_future import APIFuture, AwaitableConcurrentFuture, deprecated_async, run, settle  # noqa: F401
from .custom_loss import LossHandle  # noqa: F401 (Tinker's import path)
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

    def get_console_url(self) -> str:
        """loops has no web console: the run's id as a ``tinker://`` path stands in for its page."""
        return f"tinker://{self.model_id}"

    def get_telemetry(self) -> None:
        """loops sends no telemetry (Tinker's returns its telemetry sink; here there is none)."""
        return None

    # ---- forward / backward --------------------------------------------------------------------
    def forward(self, data: list[types.Datum], loss_fn: types.LossFnType,
                loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and per-token logprobs of ``data``; accumulated gradients are left alone."""
        sent = convert.to_loops_data(data)
        return run(APIFuture, _fb(self._client.forward_async(sent, loss_fn, _config(loss_fn_config))))

    def forward_backward(self, data: list[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: Mapping[str, float | str] | None = None
                         ) -> APIFuture[types.ForwardBackwardOutput]:
        """Forward and backward; gradients accumulate until ``optim_step``."""
        sent = convert.to_loops_data(data)
        return run(APIFuture, _fb(self._client.forward_backward_async(sent, loss_fn, _config(loss_fn_config))))

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
            raise bad_request("forward_backward_custom takes a callable loss; server-side LossHandle losses are "
                              "not supported by loops backends", "loss_fn")
        full = list(data)
        reduced = [convert.to_loops_datum(types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k in ("target_tokens", "weights")}))
            for d in full]
        return run(APIFuture, _fb(self._client.forward_backward_custom_async(
            reduced, lambda _sent, logprobs: loss_fn(full, logprobs))))

    # ---- optimizer and state ---------------------------------------------------------------------
    def optim_step(self, optim_params: types.OptimParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        """AdamW over the accumulated gradients (``tinker.types.AdamParams``: no clipping by default)."""
        if optim_params is not None and adam_params is not None:
            raise bad_request("Specify optim_params or legacy adam_params, not both", "adam_params")
        params = optim_params if optim_params is not None else adam_params
        if isinstance(params, types.DimuonParams):
            raise bad_request("loops trainers run AdamW only; pass tinker.types.AdamParams", "optim_params")
        if not isinstance(params, types.AdamParams):
            raise bad_request(f"optim_step needs tinker.types.AdamParams, got {type(params).__name__}",
                              "optim_params")

        async def go() -> types.OptimStepResponse:
            return convert.from_loops_optim_step(await settle(self._client.optim_step_async(
                convert.to_loops_adam(params))))

        return run(APIFuture, go())

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Weights and Adam state, as ``tinker://<run>/weights/<name>``."""
        async def go() -> types.SaveWeightsResponse:
            await self._check_new("training", name, overwrite)
            out = await settle(self._client.save_state_async(name, ttl_seconds))
            self._remember("weights", name, user_metadata)
            return types.SaveWeightsResponse(path=convert.from_loops_path(out.path) or out.path)

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
        return types.LoadWeightsResponse(path=convert.from_loops_path(out.path), model_id=self.model_id)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """A sampler checkpoint ``tinker://<run>/sampler_weights/<name>`` (also published to the paired sampler)."""
        async def go() -> types.SaveWeightsForSamplerResponse:
            out = await settle(self._client.save_weights_for_sampler_async(name, ttl_seconds))
            self._remember("sampler_weights", name, user_metadata)
            return types.SaveWeightsForSamplerResponse(path=convert.from_loops_path(out.path) or out.path)

        return run(APIFuture, go())

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None
                              ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """The adapter in Hugging Face (PEFT) format: loops' sampler checkpoints already are; the path
        is ``tinker://<run>/sampler_weights/<name>`` (download it with ``RestClient.get_external_weights_urls``)."""
        if age_encryption_recipients:
            raise bad_request("age_encryption_recipients is not supported by loops backends",
                              "age_encryption_recipients")

        async def go() -> types.SaveWeightsExternalResponse:
            out = await settle(self._client.save_weights_for_sampler_async(name, ttl_seconds))
            return types.SaveWeightsExternalResponse(path=convert.from_loops_path(out.path) or out.path)

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
            raise bad_request(f"kind={kind!r} is not supported by loops backends; use 'snapshot'", "kind")

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
            return convert.from_loops_info(self._client.get_info(), self.model_id)

    def get_info_async(self) -> Any:
        """Deprecated (as in tinker 0.38): use ``get_info()``."""
        warnings.warn("DEPRECATED: TrainingClient.get_info_async() is deprecated (as in tinker 0.38); use "
                      "get_info()", FutureWarning, stacklevel=2)

        async def finish() -> types.GetInfoResponse:
            return self.get_info()

        return finish()

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
    async def _check_new(self, kind: str, name: str, overwrite: bool) -> None:
        """Tinker refuses to overwrite a checkpoint unless asked; loops' public listing says what exists."""
        if overwrite or not self.model_id:
            return
        try:
            existing = await self._client.list_checkpoints_async()
        except NotImplementedError:
            return  # the backend keeps no listing (nothing to compare against)
        if any(c.checkpoint_type == kind and c.checkpoint_id == name for c in existing):
            raise status_error(409, f"checkpoint weights/{name} already exists in run {self.model_id}; pass "
                               "overwrite=True to replace it")

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


async def _fb(submitted: Any) -> types.ForwardBackwardOutput:
    return convert.from_loops_forward_backward(await settle(submitted))
