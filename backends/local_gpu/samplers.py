"""Pick the sampler engine of the ``local_gpu`` backend: vLLM when it can run, else HF."""

from __future__ import annotations

import os

from loops_core.engine import SamplerEngine

from .sampler_vllm import vllm_available

ENGINES = ("auto", "hf", "vllm")


def make_sampler_engine(base_model: str, *, engine: str = "auto", lora_rank: int | None = None,
                        activation_headroom_gb: float | None = None, **kw) -> SamplerEngine:
    """A sampler engine for ``base_model``.

    ``engine="auto"`` reads ``LOOPS_SAMPLER_ENGINE`` (``auto``/``hf``/``vllm``, at call time) and
    otherwise takes vLLM when ``vllm_available()`` (vllm importable and a CUDA GPU), else the HF
    engine. ``"hf"`` and ``"vllm"`` force one. ``kw`` goes to the engine's constructor.

    vLLM: ``max_lora_rank`` follows ``lora_rank`` (``max_lora_rank_for``), and unless ``kw`` sets
    ``gpu_memory_utilization`` / ``device``, ``placement.py`` chooses them from the memory free on
    the GPUs now: on a GPU shared with the trainer (which the caller starts first) the share leaves
    the trainer ``activation_headroom_gb`` (default: ``LOOPS_ACTIVATION_HEADROOM_GB``, else the
    estimate for the trainer's micro-batch); with two or more GPUs the sampler takes another GPU
    than the trainer's.
    """
    choice = (engine or "auto").strip().lower()
    if choice not in ENGINES:
        raise ValueError(f"unknown sampler engine {engine!r}; expected one of {ENGINES}")
    if choice == "auto":
        env = os.environ.get("LOOPS_SAMPLER_ENGINE", "").strip().lower()
        if env and env not in ENGINES:
            raise ValueError(f"LOOPS_SAMPLER_ENGINE={env!r}; expected one of {ENGINES}")
        choice = env or "auto"
    if choice == "auto":
        choice = "vllm" if vllm_available() else "hf"
    if choice == "vllm":
        if not vllm_available():
            raise RuntimeError(
                "the vLLM sampler engine needs the `vllm` package and a CUDA GPU: "
                "`pip install vllm` on a machine where torch.cuda.is_available() is True, "
                "or use engine='hf'")
        from .sampler_vllm import VLLMSamplerEngine, max_lora_rank_for

        kw.setdefault("max_lora_rank", max_lora_rank_for(lora_rank))
        if "gpu_memory_utilization" not in kw:
            kw.update(_vllm_placement(base_model, kw["max_lora_rank"], activation_headroom_gb))
        return VLLMSamplerEngine(base_model, **kw)
    from .sampler_hf import HFSamplerEngine

    return HFSamplerEngine(base_model, **kw)


def _vllm_placement(base_model: str, rank: int, headroom_gb: float | None) -> dict:
    """``gpu_memory_utilization`` for a vLLM sampler starting now (see ``placement.py``); with two
    or more GPUs also pins it to its own GPU through ``CUDA_VISIBLE_DEVICES``, which vLLM's engine
    process (started after this) inherits. A single GPU that no other process uses (a sampler in
    a container of its own, as on Modal) is the sampler's alone: no trainer headroom is kept."""
    from .placement import GiB, ModelShape, PlacementSettings, plan_placement, probe_gpus, processes_on_gpus
    from .tiny_model import resolve_model_path

    gpus = probe_gpus()
    if not gpus:
        return {}
    settings = PlacementSettings.from_env(
        lora_rank=rank, activation_headroom=None if headroom_gb is None else int(headroom_gb * GiB))
    others = processes_on_gpus()
    alone = len(gpus) == 1 and others is not None and not [p for p in others.get(0, []) if p != os.getpid()]
    plan = plan_placement(ModelShape.from_model_dir(resolve_model_path(base_model)), gpus, settings,
                          sampler_only=alone)
    index = int(plan.sampler_device.split(":")[1])
    gpu = next(g for g in gpus if g.index == index)
    if not plan.shared and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return {"gpu_memory_utilization": plan.sampler_memory_fraction(gpu.free, gpu.total)}
