"""TrainingClient: forward/backward, Adam steps, checkpoints and publication on one trainer.

Every long-running call validates and submits at once (bad input raises here, before anything
runs) and returns a future; ``.result()`` long-polls. Submissions from one client reach the server
in call order (``seq_id`` plus a turn gate), so many operations can be in flight while the trainer
still runs them in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ClientClosedError, InvalidRequestError, NotFoundError, SamplerVersionError
from .futures import ClientLifecycle, ForwardBackwardFuture, OperationFuture, on_loop, run_sync, submit, twin
from .losses import validate_batch
from .retry import poll_until
from .sampling_client import SamplingClient
from .session import Session
from .types import (AdamParams, Checkpoint, CheckpointDownload, CheckpointFilesResponse, Datum, ForwardBackwardOutput,
                    GetInfoResponse, InitTrainerServerResponse, LoadWeightsResponse, OptimStepResponse,
                    SaveWeightsForSamplerResponse, SaveWeightsResponse, TensorData, WandbConfig)
from .wire import Endpoint, WireClient

SAMPLER_WAIT_CEILING = 600.0  # seconds; independent of .result(timeout), as in the published client
CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, dict[str, float]]]


class TrainingClient(ClientLifecycle):
    def __init__(self, trainer: Endpoint | str, *, base_model: str, lora_rank: int, run_id: str | None = None,
                 sampler: Endpoint | None = None, info: GetInfoResponse | None = None, timeout: float = 600.0,
                 ready_timeout: float = 600.0, session: Session | None = None,
                 wandb_config: WandbConfig | None = None):
        if isinstance(trainer, str):
            trainer = Endpoint(url=trainer)
        self._endpoint = trainer
        self._sampler = sampler
        self._base_model = base_model
        self._lora_rank = lora_rank
        self._run_id = run_id
        self._info = info
        self._session = session
        self._closed = False
        self.timeout = timeout
        self._wire = WireClient(trainer, timeout=timeout, ready_timeout=ready_timeout)
        self._seq = 0
        self._turn_lock = threading.Lock()
        self._tail: concurrent.futures.Future[None] | None = None
        self._last_published = 0
        self._wandb = _start_wandb(wandb_config) if wandb_config else None

    # ---- ordering ------------------------------------------------------------------------------
    def _reserve(self, n: int = 1) -> list[tuple[int, Any, concurrent.futures.Future[None]]]:
        """Reserve ``n`` consecutive seq ids; each comes with the gate of the submission before it."""
        slots = []
        with self._turn_lock:
            for _ in range(n):
                self._seq += 1
                mine: concurrent.futures.Future[None] = concurrent.futures.Future()
                slots.append((self._seq, self._tail, mine))
                self._tail = mine
        return slots

    async def _submit(self, path: str, body: dict[str, Any], slot: tuple[int, Any, Any] | None = None) -> str:
        seq, prev, mine = slot or self._reserve()[0]
        try:
            self._check_open(path.strip("/"))
            if prev is not None:
                await asyncio.wrap_future(prev)  # the previous submission has been accepted (or failed)
            body = {**body, "seq_id": seq, "run_id": self._run_id, "model": self._base_model}
            return await self._wire.submit(path, body, what=path.strip("/"))
        finally:
            _release(mine)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClientClosedError(f"{what}: this TrainingClient was closed")
        if self._session is not None:
            self._session.check_open(what)

    def _future(self, op_id: str, what: str, parse: Callable[[Any], Any],
                cls: type = OperationFuture) -> OperationFuture:
        async def poll() -> Any:
            return parse(await self._wire.poll(op_id, what=what))

        return cls(submit(poll()), operation_id=op_id)

    # ---- forward / backward -------------------------------------------------------------------
    @twin
    async def forward_backward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                               loss_fn_config: dict[str, Any] | None = None,
                               top_k_logprobs: int = 0) -> ForwardBackwardFuture[ForwardBackwardOutput]:
        """Submit a forward and backward pass; the gradient is added to the accumulated one.

        ``top_k_logprobs`` (0-20) also returns, per position, the top-k token ids and logprobs.
        """
        return await self._fb("/forward_backward", data, loss_fn, loss_fn_config, top_k_logprobs)

    @twin
    async def forward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                      loss_fn_config: dict[str, Any] | None = None,
                      top_k_logprobs: int = 0) -> ForwardBackwardFuture[ForwardBackwardOutput]:
        """Forward only: the same outputs, and the accumulated gradients are left untouched."""
        return await self._fb("/forward", data, loss_fn, loss_fn_config, top_k_logprobs)

    async def _fb(self, path: str, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, Any] | None,
                  top_k_logprobs: int = 0, slot: Any = None) -> ForwardBackwardFuture:
        data = _as_datums(data)
        validate_batch(data, loss_fn, loss_fn_config,
                       max_seq_len=self._info.max_seq_len if self._info else None)
        if not isinstance(top_k_logprobs, int) or isinstance(top_k_logprobs, bool) or not 0 <= top_k_logprobs <= 20:
            raise InvalidRequestError(f"top_k_logprobs must be an integer in [0, 20], got {top_k_logprobs!r}",
                                      field="top_k_logprobs")
        body = {"data": [d.model_dump(mode="json") for d in data], "loss_fn": loss_fn,
                "loss_fn_config": loss_fn_config}
        if top_k_logprobs:
            body["top_k_logprobs"] = top_k_logprobs
        op_id = await self._submit(path, body, slot)
        return self._future(op_id, path.strip("/"), self._record_fb, ForwardBackwardFuture)

    def _record_fb(self, result: Any) -> ForwardBackwardOutput:
        out = ForwardBackwardOutput.model_validate(result)
        if self._wandb is not None:  # committed with the optimizer step: one W&B step per training step
            self._wandb.log({f"train/{k}": v for k, v in out.metrics.items()}, commit=False)
        return out

    @twin
    async def forward_backward_custom(self, data: Sequence[Datum],
                                      loss_fn: CustomLossFn) -> ForwardBackwardFuture[ForwardBackwardOutput]:
        """Train on your own loss of the per-token logprobs (needs torch on the client).

        ``loss_fn(data, logprobs)`` gets one float tensor per datum (the trainer's logprob of each
        target) and returns ``(loss, metrics)``. The client runs ``forward`` for the logprobs, takes
        d loss / d logprobs with torch, and sends a ``forward_backward`` whose cross-entropy weights
        are that gradient negated (CE is ``sum -w * logp``, so the trainer's gradient equals the
        custom loss's). Two trainer passes; ``loss:sum`` is the custom loss and the trainer's
        surrogate is reported as ``surrogate_loss:sum``.
        """
        data = _as_datums(data)
        for i, d in enumerate(data):
            extra = set(d.loss_fn_inputs) - {"target_tokens", "weights"}
            if extra:
                raise InvalidRequestError(
                    f"data[{i}].loss_fn_inputs has {sorted(extra)}; forward_backward_custom sends only "
                    "target_tokens (and weights) to the trainer: keep other inputs in your loss closure",
                    field=f"data[{i}].loss_fn_inputs")
        fwd_slot, bwd_slot = self._reserve(2)
        try:
            forward = await self._fb("/forward", data, "cross_entropy", None, 0, fwd_slot)
        except BaseException:
            _release(fwd_slot[2])
            _release(bwd_slot[2])
            raise

        async def run() -> ForwardBackwardOutput:
            try:
                fwd = await forward
                weights, loss_value, metrics = await asyncio.to_thread(_custom_gradients, data, fwd, loss_fn)
            except BaseException:
                _release(bwd_slot[2])  # open the gate so later submissions are not stuck
                raise
            surrogate = [Datum(model_input=d.model_input,
                               loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": w})
                         for d, w in zip(data, weights)]
            out = await (await self._fb("/forward_backward", surrogate, "cross_entropy", None, 0, bwd_slot))
            merged = {k: v for k, v in out.metrics.items() if k != "loss:sum"}
            merged["surrogate_loss:sum"] = out.metrics.get("loss:sum", out.loss)
            merged.update(metrics)
            merged["loss:sum"] = loss_value
            return ForwardBackwardOutput(loss=loss_value, loss_fn_output_type=out.loss_fn_output_type,
                                         loss_fn_outputs=fwd.loss_fn_outputs, metrics=merged)

        return ForwardBackwardFuture(submit(run()))

    # ---- optimizer and state ----------------------------------------------------------------
    @twin
    async def optim_step(self, adam_params: AdamParams) -> OperationFuture[OptimStepResponse]:
        """Apply the accumulated gradients with Adam(W)."""
        if not isinstance(adam_params, AdamParams):
            raise InvalidRequestError("adam_params must be an AdamParams", field="adam_params")
        op_id = await self._submit("/optim_step", {"adam_params": adam_params.model_dump()})
        return self._future(op_id, "optim_step", self._record_optim)

    def _record_optim(self, result: Any) -> OptimStepResponse:
        out = OptimStepResponse.model_validate(result)
        if self._wandb is not None:
            self._wandb.log({f"optim/{k}": v for k, v in (out.metrics or {}).items()})
        return out

    @twin
    async def save_state(self, name: str, ttl_seconds: int | None = None) -> OperationFuture[SaveWeightsResponse]:
        """Save adapter weights and Adam state as a checkpoint named ``name``."""
        return await self._simple("/save_state", {"name": name, "ttl_seconds": ttl_seconds}, SaveWeightsResponse)

    @twin
    async def load_state(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Load the weights of a ``save_state`` checkpoint (Adam starts fresh)."""
        return await self._simple("/load_state", {"path": path}, LoadWeightsResponse)

    @twin
    async def load_state_with_optimizer(self, path: str) -> OperationFuture[LoadWeightsResponse]:
        """Load weights and Adam moments: bit-exact resumption."""
        return await self._simple("/load_state_with_optimizer", {"path": path}, LoadWeightsResponse)

    @twin
    async def init_trainer_server(self, lora_rank: int,
                                  seed: int | None = None) -> OperationFuture[InitTrainerServerResponse]:
        """Reset this run to a fresh LoRA adapter of ``lora_rank`` (and a fresh optimizer)."""
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank <= 0:
            raise InvalidRequestError(f"lora_rank must be a positive integer, got {lora_rank!r}", field="lora_rank")
        body: dict[str, Any] = {"lora_rank": lora_rank, "base_model": self._base_model}
        if seed is not None:
            body["seed"] = seed

        def parse(result: Any) -> InitTrainerServerResponse:
            out = InitTrainerServerResponse.model_validate(result)
            self._lora_rank = out.lora_rank
            if self._info is not None:
                self._info = self._info.model_copy(update={"lora_rank": out.lora_rank})
            return out

        op_id = await self._submit("/init_trainer_server", body)
        return self._future(op_id, "init_trainer_server", parse)

    async def _simple(self, path: str, body: dict[str, Any], model: type) -> OperationFuture:
        if "name" in body and (not isinstance(body["name"], str) or not body["name"]):
            raise InvalidRequestError("name must be a non-empty string", field="name")
        if "path" in body and (not isinstance(body["path"], str) or not body["path"]):
            raise InvalidRequestError("path must be a checkpoint path string", field="path")
        op_id = await self._submit(path, body)
        return self._future(op_id, path.strip("/"), model.model_validate)

    # ---- publication ----------------------------------------------------------------------------
    @twin
    async def save_weights_for_sampler(self, name: str,
                                       ttl_seconds: int | None = None) -> OperationFuture[SaveWeightsForSamplerResponse]:
        """Publish the adapter to the paired sampler under ``name`` (bumps the policy version)."""
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("name must be a non-empty string", field="name")
        op_id = await self._submit("/save_weights_for_sampler",
                                   {"name": name, "ttl_seconds": ttl_seconds, "bump_version": True})

        def parse(result: Any) -> SaveWeightsForSamplerResponse:
            out = SaveWeightsForSamplerResponse.model_validate(result)
            self._last_published = max(self._last_published, out.version)
            return out

        return self._future(op_id, "save_weights_for_sampler", parse)

    @twin
    async def save_weights_and_get_sampling_client(self, name: str = "default") -> OperationFuture[SamplingClient]:
        """Publish, wait until the sampler has loaded the version, and return a client pinned to it.

        The sampler wait has its own 600 s ceiling (``SamplerVersionError`` past it).
        """
        if self._sampler is None:
            raise InvalidRequestError("this TrainingClient has no paired sampler", field="sampler")
        published = await self.save_weights_for_sampler_async(name)

        async def compose() -> SamplingClient:
            out = await published
            if out.version:
                await self._wait_for_sampler(out.version)
            return self._sampling_client(policy_version=out.version or None, min_policy_version=out.version or None,
                                         checkpoint_path=out.path)

        return OperationFuture(submit(compose()), operation_id=published.operation_id)

    async def _wait_for_sampler(self, version: int) -> None:
        assert self._sampler is not None
        probe = WireClient(self._sampler, timeout=30.0, ready_timeout=30.0)
        try:
            await poll_until(lambda: self._sampler_reached(probe, version), budget=SAMPLER_WAIT_CEILING,
                             interval=0.25, what=f"the sampler loading policy version {version}",
                             error=SamplerVersionError)
        finally:
            await probe.aclose()

    @staticmethod
    async def _sampler_reached(probe: WireClient, version: int) -> bool:
        data = await probe.get_json("/trainers_policy_version", what="sampler version")
        return int(data.get("policy_version") or 0) >= version

    @twin
    async def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A client on the paired sampler serving the sampler checkpoint at ``model_path``."""
        if not isinstance(model_path, str) or not model_path:
            raise InvalidRequestError("model_path must be a sampler checkpoint path", field="model_path")
        if "/weights/" in model_path:
            raise InvalidRequestError(
                f"{model_path!r} is a training-state checkpoint; sample from a sampler_weights path "
                "(save_weights_for_sampler returns one)", field="model_path")
        client = self._sampling_client(checkpoint_path=model_path, min_policy_version=None, policy_version=None)
        await client.ensure_ready_async(30.0)
        return client

    def _sampling_client(self, **pin: Any) -> SamplingClient:
        assert self._sampler is not None
        tokenizer_id = self._info.model_data.tokenizer_id if self._info else None
        loader = self._session.load_tokenizer if self._session is not None else None
        return SamplingClient(self._sampler, base_model=self._base_model, tokenizer_id=tokenizer_id,
                              run_id=self._run_id, tokenizer_loader=loader, **pin)

    # ---- checkpoints (the session's reads, scoped to this run) --------------------------------
    @twin
    async def list_checkpoints(self) -> list[Checkpoint]:
        """Checkpoints saved by this run."""
        if self._session is not None and self._run_id:
            return await self._session.list_checkpoints(self._run_id)
        data = await self._wire.get_json("/checkpoints", what="list checkpoints")
        return [Checkpoint.model_validate(c) for c in data.get("checkpoints", [])]

    @twin
    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        """URLs of every file in a checkpoint of this run."""
        return await self._require_session("checkpoint files").checkpoint_archive_url(checkpoint_id, page_size,
                                                                                       page_token)

    @twin
    async def download_checkpoint(self, checkpoint_id: str, *, dest_dir: str | Path) -> CheckpointDownload:
        """Download every file of a checkpoint of this run into ``dest_dir`` (new or empty)."""
        return await self._require_session("checkpoint downloads").download_checkpoint(checkpoint_id, dest_dir)

    def _require_session(self, what: str) -> Session:
        if self._session is None:
            raise NotFoundError(f"{what} need a ServiceClient-created TrainingClient", status_code=404)
        return self._session

    # ---- info -----------------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        """The base model's tokenizer (cached)."""
        tid = self._info.model_data.tokenizer_id if self._info and self._info.model_data.tokenizer_id \
            else self._base_model
        if self._session is not None:
            return self._session.load_tokenizer(tid)
        from .tokenizers import load_tokenizer

        return load_tokenizer(tid)

    def get_info(self) -> GetInfoResponse:
        """Base model, LoRA rank and max sequence length (no round trip)."""
        if self._info is None:
            self._info = run_sync(self._fetch_info())
        return self._info

    async def _fetch_info(self) -> GetInfoResponse:
        return GetInfoResponse.model_validate(await self._wire.get_json("/get_info", what="get_info"))

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def policy_version(self) -> int:
        """The latest policy version the trainer has published (asks the trainer)."""
        data = run_sync(self._wire.get_json("/policy_version", what="policy_version"))
        return int(data.get("policy_version") or 0)

    def health(self) -> None:
        """Raise if the trainer is unreachable or unhealthy."""
        run_sync(self._wire.request("GET", "/health", what="trainer health", retry=False, timeout=30.0))

    # ---- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close HTTP connections, finish the W&B run, and let the backend release this trainer's
        keep-alives (the servers stay up for sampling clients until the ServiceClient closes)."""
        run_sync(self._close())
        self._finish_wandb()

    async def aclose(self) -> None:
        await on_loop(self._close())
        self._finish_wandb()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._wire.aclose()
        if self._session is not None and self._run_id:
            await self._session.release_trainer(self._run_id)

    def _finish_wandb(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __repr__(self) -> str:
        return f"<TrainingClient {self._base_model} rank={self._lora_rank} run={self._run_id}>"


def _release(gate: concurrent.futures.Future[None]) -> None:
    if not gate.done():
        gate.set_result(None)


def _as_datums(data: Sequence[Datum]) -> list[Datum]:
    if not isinstance(data, (list, tuple)):
        raise InvalidRequestError("data must be a list of Datum", field="data")
    out = []
    for i, d in enumerate(data):
        if isinstance(d, Datum):
            out.append(d)
        elif isinstance(d, dict):
            out.append(Datum.model_validate(d))
        elif hasattr(d, "model_dump"):  # a compatible Datum from another namespace
            out.append(Datum.model_validate(d.model_dump()))
        else:
            raise InvalidRequestError(f"data[{i}] is a {type(d).__name__}, not a Datum", field=f"data[{i}]")
    return out


def _custom_gradients(data: list[Datum], fwd: ForwardBackwardOutput,
                      loss_fn: CustomLossFn) -> tuple[list[TensorData], float, dict[str, float]]:
    """Run the user's loss on leaf logprob tensors; return CE weights = -d loss / d logprobs."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise InvalidRequestError("forward_backward_custom needs torch on the client: pip install torch",
                                  field="loss_fn") from exc
    leaves = []
    for out in fwd.loss_fn_outputs:
        lp = torch.nan_to_num(out["logprobs"].to_torch().float(), nan=0.0)
        leaves.append(lp.requires_grad_(True))
    loss, metrics = loss_fn(data, leaves)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise InvalidRequestError("the custom loss must return (scalar tensor, metrics dict)", field="loss_fn")
    loss.backward()
    weights = [TensorData.from_torch(-(x.grad if x.grad is not None else torch.zeros_like(x))) for x in leaves]
    return weights, float(loss.detach()), {k: float(v) for k, v in (metrics or {}).items()}


def _start_wandb(config: WandbConfig) -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise InvalidRequestError("wandb_config needs the wandb package: pip install wandb",
                                  field="wandb_config") from exc
    return wandb.init(project=config.project, name=config.name)
