"""``TorchTrainerEngine``: LoRA training of a Hugging Face causal LM with torch + peft.

Read top to bottom, like nanoGPT's ``train.py``:

1. configuration (:class:`TrainerConfig`): device, dtype, attention, chunk sizes;
2. load the base model (``from_pretrained``; bf16 on CUDA, fp32 on CPU), freeze it;
3. ``init_lora``: wrap it with a fresh peft LoRA adapter (seeded) and a fresh AdamW over the
   LoRA parameters only;
4. ``forward_backward``: pack the datums into one row, run the transformer, compute the target
   logprobs chunk by chunk, apply the loss (``losses_torch``), backward;
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from loops_core.engine import TrainerEngine
from loops_core.types import AdamParams, Datum, ForwardBackwardOutput, TensorData

from .logprobs import target_logprobs
from .lora import make_lora_config
from .losses_torch import LOSS_FUNCTIONS, LossInputs, combine_stats
# Tests and scripts import these from this module too (e.g. trainer.pack, trainer.VARLEN).
from .packing import (VARLEN, VARLEN_IMPLEMENTATIONS, PackedBatch, _default_attention,
                      _per_datum_logprobs, _transformers_detects_packing, _varlen_kernel,
                      block_causal_mask, micro_batches, pack, varlen_attention_forward)
from .tiny_model import TINY_MODEL_NAME, model_not_found, resolve_model_path

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


class TorchTrainerEngine(TrainerEngine):
    """A Hugging Face causal LM plus one peft LoRA adapter and its AdamW."""

    def __init__(self, base_model: str, *, lora_rank: int = 32, seed: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_seq_len: int | None = None,
                 lora_alpha: float | None = None, train_attn: bool = True, train_mlp: bool = True,
                 attn_implementation: str | None = None, packing: Literal["auto", "mask"] = "auto",
                 logprob_chunk_tokens: int = 1024, micro_batch_tokens: int | None = None,
                 gradient_checkpointing: bool | None = None):
        self.config = TrainerConfig.resolve(
            base_model, device=device, dtype=dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
            train_attn=train_attn, train_mlp=train_mlp, seed=seed, max_seq_len=max_seq_len,
            attn_implementation=attn_implementation, packing=packing,
            logprob_chunk_tokens=logprob_chunk_tokens, micro_batch_tokens=micro_batch_tokens,
            gradient_checkpointing=gradient_checkpointing)
        self.device = torch.device(self.config.device)
        self.dtype = _DTYPES[self.config.dtype]

        # 2. Load the base model, frozen, in eval mode (no dropout: RL ratios need exact logprobs).
        self.base_model = base_model
        # The tiny model is named, not located: a client on another machine (Modal) resolves the
        # name to its own copy, where this container's directory would not exist.
        model_path = resolve_model_path(base_model)
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

        self.model = None  # the peft wrapper, made by init_lora
        self.init_lora(lora_rank, seed)

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

    # ---- 3. the adapter and its optimizer ------------------------------------------------------

    def init_lora(self, rank: int, seed: int | None) -> None:
        config = make_lora_config(self.base, rank, self.config.lora_alpha,
                                  train_attn=self.config.train_attn, train_mlp=self.config.train_mlp)
        self._make_adapter(config, seed)

    def _make_adapter(self, lora_config, seed: int | None) -> None:
        from peft import get_peft_model

        if self.model is not None:
            self.base = self.model.unload()  # the base modules back, without LoRA (no reload)
            self.model = None
        lora_config = copy.deepcopy(lora_config)
        lora_config.base_model_name_or_path = None  # get_peft_model sets it to the resolved path
        lora_config.inference_mode = False  # a saved adapter_config.json says True: it would freeze LoRA
        # peft creates the LoRA matrices on the CPU (then moves them), so a CPU generator seeded
        # here gives the same adapter on every device. fork_rng keeps the caller's RNG untouched.
        # Without a seed the global RNG is used (and advanced), so each unseeded init differs.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
        with rng, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # peft vs transformers 5 names
            if seed is not None:
                torch.manual_seed(seed)
            self.model = get_peft_model(self.base, lora_config, adapter_name=ADAPTER)
        # export_adapter records the name the user passed, not our resolved directory.
        self.model.peft_config[ADAPTER].base_model_name_or_path = self.base_model
        self.model.to(self.device)
        self._set_modes()
        self.lora_rank = lora_config.r
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self._new_optimizer()
        self.step = 0
        self.causal_lm = self.model.get_base_model()  # the HF model, LoRA layers injected
        self.decoder = self.causal_lm.get_decoder()  # stops at the final norm
        self.lm_head = self.causal_lm.get_output_embeddings()  # tied or not, the same module call

    def _new_optimizer(self) -> None:
        # AdamW over the LoRA parameters only; hyper-parameters are set on every optim_step.
        # Gradients live as zero tensors (not None), so "accumulated gradient" is always defined.
        # fused: one kernel for all LoRA tensors on CUDA; foreach: a few vectorised ops on CPU.
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(0.9, 0.95), eps=1e-12,
                                           weight_decay=0.0, fused=cuda or None, foreach=None if cuda else True)
        for p in self.params:
            p.grad = torch.zeros_like(p)

    # ---- 4. forward / backward ---------------------------------------------------------------

    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], *,
                         backward: bool) -> ForwardBackwardOutput:
        if self.max_seq_len is not None:
            for i, d in enumerate(data):
                if d.model_input.length > self.max_seq_len:
                    raise ValueError(f"data[{i}] has {d.model_input.length} tokens, more than "
                                     f"max_seq_len={self.max_seq_len}")
        loss_function = LOSS_FUNCTIONS[loss_fn]
        outputs: list[dict[str, TensorData]] = []
        stats = []
        for part in micro_batches(data, self.config.micro_batch_tokens, paired=loss_fn == "dpo"):
            batch = pack(data[part], loss_fn, config, self.device)
            with torch.set_grad_enabled(backward):
                lp = self._logprobs(batch)  # [N, K]
                result = loss_function(self._loss_inputs(batch, lp), config)
                if backward and result.loss.requires_grad:
                    result.loss.backward()  # adds to .grad: accumulation across calls is free
            stats.append(result.stats)
            outputs += _per_datum_logprobs(lp.detach(), batch)
        metrics = combine_stats(stats, config)
        return ForwardBackwardOutput(loss=metrics["loss:sum"], loss_fn_outputs=outputs, metrics=metrics)

    def _logprobs(self, batch: PackedBatch) -> Tensor:
        kw = {}
        if self.varlen:  # the boundaries, given rather than re-derived from position_ids per layer
            longest = max(batch.lengths)
            kw = dict(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                      max_length_q=longest, max_length_k=longest)
        elif len(set(batch.lengths)) == 1:
            # Equal lengths: a [B, L] batch is the same computation with no padding and no block
            # mask, so sdpa takes its fused causal path (B * L^2 attention, not (B * L)^2).
            shape = (len(batch.lengths), batch.lengths[0])
            hidden = self.decoder(input_ids=batch.input_ids.view(shape), position_ids=batch.position_ids.view(shape),
                                  use_cache=False).last_hidden_state
            return target_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.lm_head, batch.targets,
                                   chunk_tokens=self.config.logprob_chunk_tokens, softcap=self.softcap)
        elif self.explicit_mask:
            kw = dict(attention_mask=block_causal_mask(batch.position_ids, self.dtype))
        hidden = self.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              use_cache=False, **kw).last_hidden_state[0]
        return target_logprobs(hidden, self.lm_head, batch.targets,
                               chunk_tokens=self.config.logprob_chunk_tokens, softcap=self.softcap)

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
        for group in self.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2),
                         eps=params.eps, weight_decay=params.weight_decay)
        if params.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, params.grad_clip_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.step += 1
        return {"grad_norm:mean": float(norm), "learning_rate:mean": float(params.learning_rate)}

    # ---- 6. checkpoints ----------------------------------------------------------------------

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        self._save_adapter(directory)  # adapter_config.json + adapter_model.safetensors
        moments = {}
        for name, p in self.named_params:
            for key, value in self.optimizer.state.get(p, {}).items():
                moments[f"{name}::{key}"] = value.detach().to("cpu", copy=True).contiguous()
        save_file(moments, str(directory / STATE_OPTIMIZER), metadata={"format": "pt"})
        meta = {"step": self.step, "lora_rank": self.lora_rank, "base_model": self.base_model,
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
        current = self.model.peft_config[ADAPTER]
        if (saved.r, saved.lora_alpha, set(saved.target_modules)) != \
                (current.r, current.lora_alpha, set(current.target_modules)):
            self._make_adapter(saved, seed=None)  # a differently shaped adapter: rebuild, then load
        weights = load_file(str(directory / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing:
            raise ValueError(f"the adapter in {directory} lacks {len(missing)} LoRA weights, e.g. {missing[0]}")
        self._new_optimizer()  # also zeroes the gradients
        if with_optimizer:
            tensors = load_file(str(directory / STATE_OPTIMIZER))
            state = {}
            for i, (name, _) in enumerate(self.named_params):
                entry = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
                if entry:
                    state[i] = entry
            sd = self.optimizer.state_dict()
            sd["state"] = state
            self.optimizer.load_state_dict(sd)  # casts moments to each parameter's device/dtype
        self.step = int(meta["step"])

    def export_adapter(self, directory: Path) -> None:
        self._save_adapter(Path(directory))

    def _save_adapter(self, directory: Path) -> None:
        # Standard PEFT files: keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        # (no adapter name), which peft.PeftModel.from_pretrained and vLLM's LoRA loader read.
        # save_embedding_layers=False: we never adapt embeddings, and "auto" would ask the hub
        # whether the base model's vocabulary was resized.
        self.model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
        readme = directory / "README.md"  # peft's model-card stub; not part of the adapter
        if readme.exists():
            readme.unlink()

    def close(self) -> None:
        self.model = self.base = self.causal_lm = self.decoder = self.lm_head = None
        self.optimizer = None
        self.params = self.named_params = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

