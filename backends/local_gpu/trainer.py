"""``TorchTrainerEngine``: LoRA training of a Hugging Face causal LM with torch + peft.

Read top to bottom, like nanoGPT's ``train.py``:

1. configuration (:class:`TrainerConfig`): device, dtype, attention, chunk sizes;
2. load the base model (``from_pretrained``; bf16 on CUDA, fp32 on CPU), freeze it;
3. ``init_lora``: a run = a fresh peft LoRA adapter (seeded) and a fresh AdamW over its LoRA
   parameters only; many runs share the base model as named peft adapters (``trainer_runs.py``:
   ``use_run`` switches, a resident-run cap moves idle runs off the GPU and back bit for bit);
4. ``forward_backward``: pack the datums into one row, run the transformer (on CUDA: LoRA
   matmuls in bf16 under autocast, fp32 master weights), compute the target logprobs chunk by
   chunk (optionally the top-k), apply the loss (``losses_torch``), backward; no host-device sync
   until one transfer at the end, and a non-finite loss or gradient changes nothing;
5. ``optim_step``: set Adam's hyper-parameters, clip, step, zero the gradients;
6. ``save_state`` / ``load_state`` (safetensors + JSON, never pickle) and ``export_adapter``
   (a standard PEFT directory that peft and vLLM load).

Packing (``packing.py``): all datums of a call go into one row of tokens, no padding, split into
micro-batches of ``micro_batch_tokens``; the attention (varlen, or a block-diagonal mask) keeps
them apart. Logprobs (``logprobs.py``): the target logprobs are computed chunk by chunk from the
final hidden states, so the full ``[tokens x vocab]`` logits never exist at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from loops_core.engine import TrainerEngine
from loops_core.types import AdamParams, Datum, ForwardBackwardOutput, TensorData

from . import kernels
from .logprobs import fused_ce_available, logprobs_and_topk, target_logprobs  # noqa: F401 (re-exported)
from .losses_torch import LOSS_FUNCTIONS, LossInputs, combine_stats
# Tests and scripts import these from this module too (e.g. trainer.pack, trainer.VARLEN).
from .packing import (VARLEN, VARLEN_IMPLEMENTATIONS, PackedBatch, _default_attention,
                      _per_datum_logprobs, _to_host, _transformers_detects_packing, _varlen_kernel,
                      block_causal_mask, micro_batches, pack, varlen_attention_forward)
from .tiny_model import TINY_MODEL_NAME, model_not_found, resolve_model_path
from .trainer_runs import ManyRuns

try:  # the multi-run contract's names (loops_core.engine gains them with the many-runs server)
    from loops_core.engine import MAX_TOP_K_LOGPROBS, NonFiniteError
except ImportError:  # pragma: no cover - until that lands
    MAX_TOP_K_LOGPROBS = 20

    class NonFiniteError(ValueError):
        """A loss or gradient came out NaN or infinite; the operation changed nothing."""

ADAPTER = "default"  # peft adapter name; part of the stable parameter names in saved state
STATE_META = "trainer_state.json"
STATE_OPTIMIZER = "optimizer.safetensors"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    base_model: str
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: lora.DEFAULT_ALPHA (32), so lr does not depend on rank
    train_attn: bool = True
    train_mlp: bool = True
    seed: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_seq_len: int | None = None
    attn_implementation: str = "sdpa"
    packing: Literal["auto", "mask"] = "auto"  # "mask": always pass our own block-diagonal mask
    logprob_chunk_tokens: int = 1024  # rows of logits alive at once
    # Tokens per packed row before a call is split. Varlen attention costs sum(len_i^2), so rows
    # can be long; a block-diagonal mask costs N^2 whatever the datums, so rows stay shorter.
    micro_batch_tokens: int = 16384
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (on by default on CUDA)
    # The dtype LoRA's matmuls run in. None: the base model's when that is bf16/fp16 (autocast;
    # peft keeps the LoRA weights, their gradients and Adam's moments in fp32 either way), else
    # fp32. "float32" is the old path (peft upcasts activations to fp32 for every LoRA matmul).
    lora_compute_dtype: str | None = None
    # TF32 tensor cores for the matmuls that stay fp32 (CUDA only). None: on with a half-precision
    # base (fp32 LoRA matmuls there, if asked for, need no more); off when the user chose fp32.
    tf32: bool | None = None
    # At most this many runs keep their adapter + Adam state on the device; the least recently
    # used others wait on ``offload_device`` (moved back, bit for bit, when next used). None: no cap.
    max_resident_runs: int | None = None
    offload_device: str = "cpu"
    # liger-kernel's fused linear cross-entropy for the target logprobs when it is installed and
    # the model runs on CUDA ("auto"), never ("off"). See logprobs.py for when it applies.
    fused_ce: Literal["auto", "off"] = "auto"

    @classmethod
    def resolve(cls, base_model: str, *, device: str | None, dtype: str | None, **kw) -> "TrainerConfig":
        """Fill in what depends on the machine: CUDA if present, bf16 there, fp32 on CPU."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        if dt not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dt!r}")
        if kw.get("attn_implementation") is None:
            kw["attn_implementation"] = _default_attention(dev, _DTYPES[dt])
        if kw.get("micro_batch_tokens") is None:
            kw["micro_batch_tokens"] = 16384 if kw["attn_implementation"] in VARLEN_IMPLEMENTATIONS else 4096
        if kw.get("gradient_checkpointing") is None:
            kw["gradient_checkpointing"] = dev.type == "cuda"
        kw = {k: v for k, v in kw.items() if v is not None}
        return cls(base_model=base_model, device=str(dev), dtype=dt, **kw)


def _register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)


def _varlen_attention(*args, **kwargs):
    # The kernel is looked up in this module on every call (as before the attention function
    # moved to packing.py), so that a test can swap ``trainer._varlen_kernel`` for a CPU stand-in.
    return varlen_attention_forward(*args, kernel=_varlen_kernel(), **kwargs)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class TorchTrainerEngine(ManyRuns, TrainerEngine):
    """A Hugging Face causal LM plus, per run, a peft LoRA adapter and its AdamW."""

    def __init__(self, base_model: str, *, lora_rank: int = 32, seed: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_seq_len: int | None = None,
                 lora_alpha: float | None = None, train_attn: bool = True, train_mlp: bool = True,
                 attn_implementation: str | None = None, packing: Literal["auto", "mask"] = "auto",
                 logprob_chunk_tokens: int = 1024, micro_batch_tokens: int | None = None,
                 gradient_checkpointing: bool | None = None, lora_compute_dtype: str | None = None,
                 tf32: bool | None = None, max_resident_runs: int | None = None, offload_device: str = "cpu",
                 fused_ce: Literal["auto", "off"] = "auto"):
        self.config = TrainerConfig.resolve(
            base_model, device=device, dtype=dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
            train_attn=train_attn, train_mlp=train_mlp, seed=seed, max_seq_len=max_seq_len,
            attn_implementation=attn_implementation, packing=packing,
            logprob_chunk_tokens=logprob_chunk_tokens, micro_batch_tokens=micro_batch_tokens,
            gradient_checkpointing=gradient_checkpointing, lora_compute_dtype=lora_compute_dtype,
            tf32=tf32, max_resident_runs=max_resident_runs, offload_device=offload_device, fused_ce=fused_ce)
        self.device = torch.device(self.config.device)
        self.dtype = _DTYPES[self.config.dtype]
        if max_resident_runs is not None and max_resident_runs < 1:
            raise ValueError(f"max_resident_runs must be >= 1 (or None for no cap), got {max_resident_runs}")
        compute = self.config.lora_compute_dtype
        if compute is not None and compute not in _DTYPES:
            raise ValueError(f"lora_compute_dtype must be one of {sorted(_DTYPES)}, got {compute!r}")
        compute_dtype = _DTYPES[compute] if compute else self.dtype
        # Autocast only where it changes something: half-precision LoRA matmuls on a half base.
        self._autocast_dtype = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else None
        tf32 = self.config.tf32 if self.config.tf32 is not None else self.dtype != torch.float32
        if self.device.type == "cuda" and tf32:
            torch.set_float32_matmul_precision("high")  # TF32 for what stays fp32 (this process only)
        self._fused_ce = self.config.fused_ce == "auto" and self.device.type == "cuda" and fused_ce_available()
        self._init_runs()

        # 2. Load the base model, frozen, in eval mode (no dropout: RL ratios need exact logprobs).
        self.base_model = base_model
        # The tiny model is named, not located: a client on another machine (Modal) resolves the
        # name to its own copy, where this container's directory would not exist.
        model_path = resolve_model_path(base_model)
        if self.device.type == "cuda":
            self._check_fits(model_path)
        self.tokenizer_id = TINY_MODEL_NAME if base_model == TINY_MODEL_NAME else model_path
        self.base = self._load_base(model_path)
        hf_config = self.base.config
        self.arch = (getattr(hf_config, "architectures", None) or [type(self.base).__name__])[0]
        self.vocab_size = self.base.get_input_embeddings().weight.shape[0]
        self.max_seq_len = max_seq_len or getattr(hf_config, "max_position_embeddings", None)
        self.softcap = getattr(hf_config, "final_logit_softcapping", None)
        # Who keeps packed datums apart (see packing.py).
        self.varlen = self.config.attn_implementation in VARLEN_IMPLEMENTATIONS
        self.explicit_mask = not self.varlen and (
            self.config.packing == "mask" or not _transformers_detects_packing())

        self.init_lora(lora_rank, seed)

    def _check_fits(self, model_path: str) -> None:
        """A clear error before loading when the model cannot fit (placement.py's estimate)."""
        from .placement import Gpu, ModelShape, PlacementSettings, check_trainer_fits

        if not (Path(model_path) / "config.json").is_file():
            return  # a hub id: transformers resolves it; its shape is not known here yet
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        settings = PlacementSettings.from_env(
            lora_rank=self.config.lora_rank, micro_batch_tokens=self.config.micro_batch_tokens,
            logprob_chunk_tokens=self.config.logprob_chunk_tokens,
            gradient_checkpointing=self.config.gradient_checkpointing,
            dtype_bytes=torch.finfo(self.dtype).bits // 8)
        check_trainer_fits(ModelShape.from_model_dir(model_path), Gpu(index, total, free), settings)

    def _load_base(self, path: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if self.config.attn_implementation == VARLEN:
            _register_varlen()
        kw = dict(dtype=self.dtype, attn_implementation=self.config.attn_implementation)
        if self.device.type == "cuda":
            kw["device_map"] = {"": self.device}  # load straight onto the GPU
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except OSError as e:  # not local, not on the hub (or hub unreachable)
            raise model_not_found(self.base_model, e) from e
        model.to(self.device)
        model.requires_grad_(False)
        if self._fused_ce:  # liger's RMSNorm/SwiGLU/RoPE too, where it has them (kernels.py)
            kernels.patch_model(model)
        if self.config.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _set_modes(self) -> None:
        """Eval mode everywhere (dropout off), except the flag HF's checkpointed decoder layers
        read: they only recompute in backward when ``layer.training`` is True. Setting that one
        attribute (not ``.train()``) leaves every dropout inside the layer in eval mode."""
        self.model.eval()
        if self.config.gradient_checkpointing:
            try:
                from transformers.modeling_layers import GradientCheckpointingLayer as Layer
            except ImportError:  # older transformers: the layers carry the flag without a base class
                Layer = nn.Module
            for m in self.model.modules():
                if isinstance(m, Layer) and getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True

    # ---- 3. runs: an adapter and its optimizer each --------------------------------------------
    # init_lora, use_run, close_run, runs, and the current run's lora_rank / step / params /
    # optimizer come from ManyRuns (trainer_runs.py).

    # ---- 4. forward / backward ---------------------------------------------------------------

    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], *,
                         backward: bool, top_k_logprobs: int = 0) -> ForwardBackwardOutput:
        """Runs every micro-batch without a host-device sync (the active rows are found while
        packing, on the host; results stay on the device), then copies everything the reply
        needs to the host in one transfer at the end. The new gradient is computed on its own
        and added to the accumulated one only when it and the loss are finite."""
        run = self.current
        if self.max_seq_len is not None:
            for i, d in enumerate(data):
                if d.model_input.length > self.max_seq_len:
                    raise ValueError(f"data[{i}] has {d.model_input.length} tokens, more than "
                                     f"max_seq_len={self.max_seq_len}")
        top_k = int(top_k_logprobs or 0)
        if not 0 <= top_k <= MAX_TOP_K_LOGPROBS:
            raise ValueError(f"top_k_logprobs must be in [0, {MAX_TOP_K_LOGPROBS}], got {top_k}")
        loss_function = LOSS_FUNCTIONS[loss_fn]
        batches, results, stats = [], [], []
        params = run.params
        accumulated = [p.grad for p in params]
        if backward:
            for p in params:  # this call's gradient lands in fresh buffers
                p.grad = None
        try:
            for part in micro_batches(data, self.config.micro_batch_tokens, paired=loss_fn == "dpo"):
                batch = pack(data[part], loss_fn, config, self.device)
                with torch.set_grad_enabled(backward):
                    with self._compute_context():
                        lp, topk = self._logprobs(batch, top_k)  # [N, K]
                    result = loss_function(self._loss_inputs(batch, lp), config)
                    if backward and result.loss.requires_grad:
                        result.loss.backward()  # adds to .grad across micro-batches
                batches.append(batch)
                results.append((torch.where(batch.targets >= 0, lp.detach(), math.nan), topk))
                stats.append(result.stats)
            grad_norm = None
            if backward:
                fresh = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.stack(torch._foreach_norm(fresh)).sum() if fresh else None
            host = _to_host(stats, results, grad_norm)  # the one device-to-host transfer
        except BaseException:
            if backward:
                for p, g in zip(params, accumulated):
                    p.grad = g
            raise
        stats, results, grad_norm = host
        bad = [name for name in ("loss:sum",) if not all(math.isfinite(float(s[name][0])) for s in stats)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append("gradient")
        if backward:
            fresh = [p.grad for p in params]
            for p, g in zip(params, accumulated):
                p.grad = g
            if not bad:
                pairs = [(g, f) for g, f in zip(accumulated, fresh) if f is not None]
                if pairs:
                    torch._foreach_add_([g for g, _ in pairs], [f for _, f in pairs])
        if bad:
            raise NonFiniteError(
                f"{loss_fn}: the {' and the '.join(bad)} came out NaN or infinite; nothing was "
                f"applied (adapter, optimizer and accumulated gradients are unchanged). Check the "
                f"loss inputs (advantages, logprobs, weights) for extreme values")
        outputs: list[dict[str, TensorData]] = []
        for batch, (lp, topk) in zip(batches, results):
            outputs += _per_datum_logprobs(lp, batch, topk)  # host tensors, NaN where inactive
        metrics = combine_stats(stats, config)
        return ForwardBackwardOutput(loss=metrics["loss:sum"], loss_fn_outputs=outputs, metrics=metrics)

    def _compute_context(self):
        """bf16 LoRA compute on a bf16 base (autocast; the fp32 LoRA master weights and Adam state
        stay fp32), else nothing: see ``TrainerConfig.lora_compute_dtype``. peft would first cast
        each LoRA layer's bf16 input up to its fp32 weights' dtype (only for autocast to cast it
        back down): that round trip is switched off inside the context."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype))
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:  # older peft: the round trip stays (same values, more memory traffic)
            return stack
        stack.enter_context(disable_input_dtype_casting(self.model))
        return stack

    def _logprobs(self, batch: PackedBatch, top_k: int = 0) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        kw = {}
        hidden_of = lambda h: h[0]  # noqa: E731 - one packed row
        if self.varlen:  # the boundaries, given rather than re-derived from position_ids per layer
            longest = max(batch.lengths)
            kw = dict(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                      max_length_q=longest, max_length_k=longest)
            ids, pos = batch.input_ids, batch.position_ids
        elif len(set(batch.lengths)) == 1:
            # Equal lengths: a [B, L] batch is the same computation with no padding and no block
            # mask, so sdpa takes its fused causal path (B * L^2 attention, not (B * L)^2).
            shape = (len(batch.lengths), batch.lengths[0])
            ids, pos = batch.input_ids.view(shape), batch.position_ids.view(shape)
            hidden_of = lambda h: h.reshape(-1, h.shape[-1])  # noqa: E731
        else:
            if self.explicit_mask:
                kw = dict(attention_mask=block_causal_mask(batch.position_ids, self.dtype))
            ids, pos = batch.input_ids, batch.position_ids
        hidden = hidden_of(self.decoder(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state)
        return logprobs_and_topk(hidden, self.lm_head, batch.targets, chunk_tokens=self.config.logprob_chunk_tokens,
                                 softcap=self.softcap, rows=batch.active_rows, num_rows=batch.num_active,
                                 top_k=top_k, fused=self._fused_ce)

    @staticmethod
    def _loss_inputs(batch: PackedBatch, lp: Tensor) -> LossInputs:
        x = batch.inputs
        return LossInputs(
            logprobs=lp, active=batch.targets >= 0, weights=x["weights"], datum=batch.datum,
            num_datums=len(batch.lengths), sampler_logprobs=x.get("logprobs"),
            advantages=x.get("advantages"), ref_logprobs=x.get("ref_logprobs"),
            clip_low=x.get("clip_low_threshold"), clip_high=x.get("clip_high_threshold"),
            sequence_ratio_mask=x.get("sequence_ratio_mask"), sampled_mask=x.get("sampled_mask"))

    # ---- 5. the optimizer step ---------------------------------------------------------------

    def optim_step(self, params: AdamParams) -> dict[str, float]:
        run = self.current
        for group in run.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2),
                         eps=params.eps, weight_decay=params.weight_decay)
        if params.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(run.params, params.grad_clip_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in run.params]))
        norm = float(norm)
        if not math.isfinite(norm):  # accumulated gradients were checked; this is a last guard
            raise NonFiniteError("the accumulated gradient's norm is NaN or infinite; no step was taken")
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=False)
        run.step += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": float(params.learning_rate)}

    # ---- 6. checkpoints (of the current run) --------------------------------------------------

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        run = self.current
        directory = Path(directory)
        self._save_adapter(directory)  # adapter_config.json + adapter_model.safetensors
        moments = {}
        for name, p in run.named_params:
            for key, value in run.optimizer.state.get(p, {}).items():
                moments[f"{name}::{key}"] = value.detach().to("cpu", copy=True).contiguous()
        save_file(moments, str(directory / STATE_OPTIMIZER), metadata={"format": "pt"})
        meta = {"step": run.step, "lora_rank": run.rank, "base_model": self.base_model,
                "arch": self.arch, "adapter_name": ADAPTER}
        (directory / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")

    def load_state(self, directory: Path, *, with_optimizer: bool) -> None:
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / STATE_META).read_text())
        if meta.get("base_model") != self.base_model:
            raise ValueError(f"the state in {directory} was trained on {meta.get('base_model')!r}, "
                             f"not on this engine's base model {self.base_model!r}")
        saved = LoraConfig.from_pretrained(str(directory))
        run = self.current
        current = self.model.peft_config[run.adapter]
        if (saved.r, saved.lora_alpha, set(saved.target_modules)) != \
                (current.r, current.lora_alpha, set(current.target_modules)):
            self._make_adapter(saved, None, run.run)  # a differently shaped adapter: rebuild, then load
            run = self.current
        weights = load_file(str(directory / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=run.adapter)
        missing = [k for k in result.missing_keys if f".{run.adapter}." in k and ".lora_" in k]
        if missing:
            raise ValueError(f"the adapter in {directory} lacks {len(missing)} LoRA weights, e.g. {missing[0]}")
        self._new_optimizer()  # also zeroes the gradients
        if with_optimizer:
            tensors = load_file(str(directory / STATE_OPTIMIZER))
            state = {}
            for i, (name, _) in enumerate(run.named_params):
                entry = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
                if entry:
                    state[i] = entry
            sd = run.optimizer.state_dict()
            sd["state"] = state
            run.optimizer.load_state_dict(sd)  # casts moments to each parameter's device/dtype
        run.step = int(meta["step"])

    def export_adapter(self, directory: Path) -> None:
        self._save_adapter(Path(directory))

    def _save_adapter(self, directory: Path) -> None:
        # Standard PEFT files: keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        # (no adapter name), which peft.PeftModel.from_pretrained and vLLM's LoRA loader read.
        # Written here rather than by save_pretrained, which puts any adapter not named "default"
        # in a subdirectory. save_embedding_layers=False: we never adapt embeddings, and "auto"
        # would ask the hub whether the base model's vocabulary was resized.
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        run = self.current
        weights = get_peft_model_state_dict(self.model, adapter_name=run.adapter, save_embedding_layers=False)
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(self.model.peft_config[run.adapter])
        config.inference_mode = True
        config.base_model_name_or_path = self.base_model
        config.save_pretrained(str(directory))

    def close(self) -> None:
        self.model = self.base = self.causal_lm = self.decoder = self.lm_head = None
        self._runs.clear()
        self._current = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

