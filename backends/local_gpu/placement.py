"""Where the local trainer and sampler go, and how much GPU memory the sampler may take.

A pure planning step, so that it can be unit-tested with made-up memory figures:
:func:`plan_placement` takes the model's shape (:class:`ModelShape`), the GPUs' total and free
memory (:class:`Gpu`) and the settings (:class:`PlacementSettings`), and returns a
:class:`Placement` or raises :class:`PlacementError` *before anything is loaded*.

* Two or more GPUs: the trainer goes to the first (``cuda:0``, where the trainer engine goes by
  default), the sampler to the other GPU with the most free memory; each must fit on its own.
  (Fixed, not by free memory: trainer and sampler plan in their own processes, one possibly after
  the other has loaded, and must agree.)
* One GPU: trainer and sampler share it. The trainer loads first; the sampler (vLLM reserves its
  share of memory up front) then takes ``(free memory after the trainer is up - activation
  headroom - safety) / total``: :meth:`Placement.sampler_memory_fraction`, computed in the sampler
  process from the memory it actually sees free. The activation headroom is what the trainer will
  allocate later, in its first ``forward_backward``, at the configured micro-batch.

The memory figures are estimates with stated margins (see :func:`trainer_bytes`); the headroom
can be set outright with ``LOOPS_ACTIVATION_HEADROOM_GB`` (read when the plan is made), which the
``--activation-headroom-gb`` option of ``loops serve`` overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
HEADROOM_ENV = "LOOPS_ACTIVATION_HEADROOM_GB"
CUDA_CONTEXT_BYTES = GiB  # CUDA context, cuBLAS workspaces and allocator slack, per process


class PlacementError(ValueError):
    """The model (or the pair) cannot fit on the GPUs here; the message says what would."""


# --------------------------------------------------------------------------------------------
# Inputs: the model's shape, the GPUs, the settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from an HF ``config.json``."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(layers=int(cfg["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(cfg.get("intermediate_size") or 4 * hidden), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of the seven adapted linear layers of one block (llama-like)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def params(self) -> int:
        block = sum(a * b for a, b in self.projections()) + 4 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * block + embed + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.projections())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Gpu:
    index: int
    total: int  # bytes
    free: int  # bytes


@dataclass(frozen=True)
class PlacementSettings:
    lora_rank: int = 32
    micro_batch_tokens: int = 16384  # the trainer's default on CUDA (varlen attention)
    logprob_chunk_tokens: int = 1024
    gradient_checkpointing: bool = True  # the trainer's default on CUDA
    dtype_bytes: int = 2  # bf16 base weights
    sampler_engine: str = "vllm"  # "vllm" reserves memory up front; "hf" grows as it goes
    max_loras: int = 4  # adapters vLLM keeps on the GPU at once
    sampler_min_kv_tokens: int = 8192  # the least KV cache worth starting a sampler for
    activation_headroom: int | None = None  # bytes; None: estimated (see activation_bytes)
    safety: int = GiB // 2  # left free on a shared GPU for fragmentation and stray allocations
    max_sampler_fraction: float = 0.92  # of a GPU the sampler has to itself

    @classmethod
    def from_env(cls, **kw) -> "PlacementSettings":
        """Settings with ``LOOPS_ACTIVATION_HEADROOM_GB`` applied (an explicit keyword wins)."""
        raw = os.environ.get(HEADROOM_ENV, "").strip()
        if raw and kw.get("activation_headroom") is None:
            try:
                kw["activation_headroom"] = int(float(raw) * GiB)
            except ValueError:
                raise PlacementError(f"{HEADROOM_ENV}={raw!r} is not a number of GiB (e.g. 6 or 2.5)") from None
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------


def activation_bytes(shape: ModelShape, s: PlacementSettings) -> int:
    """Peak training activations of one micro-batch of ``s.micro_batch_tokens`` tokens (bf16).

    With checkpointing: each block's input (T x H) is kept, plus one block's recompute working set
    in backward (about 8 H + 4 I values per token: norms, q/k/v/o, the MLP's three projections and
    their gradients); without it every block's working set is kept. Plus the chunked logprobs:
    up to three fp32 [chunk x vocab] tensors (logits, softmax, gradient). Then x1.25 for the
    allocator's rounding and what this sum leaves out.
    """
    t, b = s.micro_batch_tokens, s.dtype_bytes
    block = t * (8 * shape.hidden + 4 * shape.intermediate) * b
    kept = t * shape.hidden * b * shape.layers if s.gradient_checkpointing else block * shape.layers
    logits = 3 * min(t, s.logprob_chunk_tokens) * shape.vocab * 4
    return int(1.25 * (kept + block + logits))


def trainer_bytes(shape: ModelShape, s: PlacementSettings) -> tuple[int, int]:
    """(resident bytes once loaded, activation headroom): bf16 weights, fp32 LoRA master
    weights + gradients + two Adam moments (16 bytes a parameter), the CUDA context; and the
    headroom (the setting, or :func:`activation_bytes`)."""
    resident = shape.params * s.dtype_bytes + 16 * shape.lora_params(s.lora_rank) + CUDA_CONTEXT_BYTES
    headroom = s.activation_headroom if s.activation_headroom is not None else activation_bytes(shape, s)
    return resident, headroom


def sampler_min_bytes(shape: ModelShape, s: PlacementSettings) -> int:
    """The least a sampler needs: bf16 weights, ``max_loras`` bf16 adapter slots, the CUDA
    context, and (vLLM) a KV cache of ``sampler_min_kv_tokens`` plus ~1 GiB for its activations."""
    need = shape.params * s.dtype_bytes + s.max_loras * 2 * shape.lora_params(s.lora_rank) + CUDA_CONTEXT_BYTES
    if s.sampler_engine == "vllm":
        need += s.sampler_min_kv_tokens * shape.kv_bytes_per_token(s.dtype_bytes) + GiB
    return need


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    trainer_device: str  # "cuda:N" (torch index among the visible devices)
    sampler_device: str
    shared: bool  # one GPU for both
    trainer_resident: int
    activation_headroom: int
    sampler_min: int
    settings: PlacementSettings = field(default_factory=PlacementSettings)

    def sampler_memory_fraction(self, free: int, total: int) -> float:
        """vLLM's ``gpu_memory_utilization`` (a fraction of the GPU's *total* memory that vLLM
        may use; it refuses to start when less than that is free), from the memory ``free`` on the
        sampler's GPU now. On a shared GPU this is called after the trainer is up, and leaves the
        trainer its activation headroom."""
        s = self.settings
        keep = self.activation_headroom + s.safety if self.shared else s.safety
        usable = free - keep
        if usable < self.sampler_min:
            where = "after the trainer loaded, " if self.shared else ""
            raise PlacementError(
                f"the sampler needs about {_gib(self.sampler_min)} but {where}{_gib(free)} is free on "
                f"{self.sampler_device} of which {_gib(keep)} must stay free "
                f"({'training activations + ' if self.shared else ''}safety); "
                f"{_fixes(self.shared)}")
        return round(min(usable / total, s.max_sampler_fraction), 4)


def plan_placement(shape: ModelShape, gpus: list[Gpu], settings: PlacementSettings | None = None, *,
                   sampler_only: bool = False) -> Placement:
    """Place trainer and sampler on ``gpus`` (see the module docstring), or raise PlacementError.
    ``sampler_only``: no trainer shares these GPUs (a sampler in a container of its own); the
    sampler takes the GPU with the most free memory."""
    s = settings or PlacementSettings()
    if not gpus:
        raise PlacementError("no CUDA GPU is visible: the local backend runs on the CPU instead "
                             "(placement only plans GPUs)")
    resident, headroom = trainer_bytes(shape, s)
    sampler = sampler_min_bytes(shape, s)
    if sampler_only:
        g = max(gpus, key=lambda x: (x.free, -x.index))
        if sampler + s.safety > g.free:
            raise PlacementError(f"the sampler needs about {_gib(sampler)} but cuda:{g.index} has "
                                 f"{_gib(g.free)} free; {_fixes(False)}")
        return Placement("", f"cuda:{g.index}", False, 0, 0, sampler, s)
    trainer_need = resident + headroom
    if len(gpus) >= 2:
        t = min(gpus, key=lambda g: g.index)
        smp = max((g for g in gpus if g is not t), key=lambda g: (g.free, -g.index))
        if trainer_need > t.free:
            raise PlacementError(
                f"the trainer needs about {_gib(trainer_need)} ({_gib(resident)} weights and LoRA "
                f"state + {_gib(headroom)} activations at {s.micro_batch_tokens} tokens a micro-batch) "
                f"but cuda:{t.index} has {_gib(t.free)} free; {_fixes(False)}")
        if sampler + s.safety > smp.free:
            raise PlacementError(f"the sampler needs about {_gib(sampler)} but cuda:{smp.index} has "
                                 f"{_gib(smp.free)} free; {_fixes(False)}")
        return Placement(f"cuda:{t.index}", f"cuda:{smp.index}", False, resident, headroom, sampler, s)
    g = gpus[0]
    both = trainer_need + sampler + s.safety
    if both > g.free:
        raise PlacementError(
            f"trainer and sampler do not fit together on cuda:{g.index}: the trainer needs about "
            f"{_gib(trainer_need)} ({_gib(resident)} weights and LoRA state + {_gib(headroom)} activations "
            f"at {s.micro_batch_tokens} tokens a micro-batch), the {s.sampler_engine} sampler at least "
            f"{_gib(sampler)}, and {_gib(g.free)} of {_gib(g.total)} is free; {_fixes(True)}")
    return Placement(f"cuda:{g.index}", f"cuda:{g.index}", True, resident, headroom, sampler, s)


def check_trainer_fits(shape: ModelShape, gpu: Gpu, settings: PlacementSettings | None = None) -> None:
    """The trainer's own check, before it loads anything: its weights, LoRA state and activation
    headroom fit in what is free on its GPU now."""
    s = settings or PlacementSettings()
    resident, headroom = trainer_bytes(shape, s)
    if resident + headroom > gpu.free:
        raise PlacementError(
            f"the trainer needs about {_gib(resident + headroom)} ({_gib(resident)} weights and LoRA state + "
            f"{_gib(headroom)} activations at {s.micro_batch_tokens} tokens a micro-batch) but cuda:{gpu.index} "
            f"has {_gib(gpu.free)} free of {_gib(gpu.total)}; {_fixes(False)}")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _fixes(shared: bool) -> str:
    tips = ["use a smaller model or LoRA rank", "lower the trainer's micro_batch_tokens"]
    if shared:
        tips += [f"set {HEADROOM_ENV} (or `loops serve --activation-headroom-gb`) if the estimate is "
                 f"too cautious", "use the HF sampler (sampler_engine='hf', no up-front reservation)",
                 "or add a second GPU"]
    return "; ".join(tips)


# --------------------------------------------------------------------------------------------
# Reading the machine (the only impure part)
# --------------------------------------------------------------------------------------------


def probe_gpus() -> list[Gpu]:
    """Total and free memory of each visible GPU, without creating a CUDA context in this process
    (``nvidia-smi``, honouring ``CUDA_VISIBLE_DEVICES``); falls back to torch when nvidia-smi is
    missing. Indexes are torch's (positions among the visible devices)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total,memory.free",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout
            rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                wanted = [v.strip() for v in visible.split(",") if v.strip()]
                by_key = {r[0]: r for r in rows} | {r[1]: r for r in rows}
                rows = [by_key[w] for w in wanted if w in by_key]
            return [Gpu(i, int(r[2]) << 20, int(r[3]) << 20) for i, r in enumerate(rows)]
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, int(total), int(free)))
    return gpus


def processes_on_gpus() -> dict[int, list[int]] | None:
    """PIDs of the compute processes on each visible GPU (torch indexes), from ``nvidia-smi``;
    None when it cannot tell."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        gpus = subprocess.run([smi, "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=True).stdout
        apps = subprocess.run([smi, "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in gpus.strip().splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        by_key = {r[0]: r for r in rows} | {r[1]: r for r in rows}
        rows = [by_key[w] for w in wanted if w in by_key]
    index_of = {r[1]: i for i, r in enumerate(rows)}
    out: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    for line in apps.strip().splitlines():
        parts = [c.strip() for c in line.split(",")]
        if len(parts) == 2 and parts[0] in index_of and parts[1].isdigit():
            out[index_of[parts[0]]].append(int(parts[1]))
    return out


def trainer_first() -> bool:
    """Whether the local backend must start the trainer and wait for it before starting the
    sampler: one GPU shared by both (the sampler sizes its share from what the trainer left).
    With no GPU, or two or more, both can start at once."""
    return len(probe_gpus()) == 1


def plan_for_model(model_path: str | Path, *, gpus: list[Gpu] | None = None, **settings) -> Placement | None:
    """:func:`plan_placement` for the model directory here and the GPUs here (None without a GPU).
    ``settings`` are :class:`PlacementSettings` fields; the headroom env variable applies."""
    gpus = probe_gpus() if gpus is None else gpus
    if not gpus:
        return None
    return plan_placement(ModelShape.from_model_dir(model_path), gpus, PlacementSettings.from_env(**settings))


