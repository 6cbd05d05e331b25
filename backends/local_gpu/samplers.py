"""Pick the sampler engine of the ``local_gpu`` backend: vLLM when it can run, else HF."""

from __future__ import annotations

import os

from loops_core.engine import SamplerEngine

from .sampler_vllm import vllm_available

ENGINES = ("auto", "hf", "vllm")


def make_sampler_engine(base_model: str, *, engine: str = "auto", **kw) -> SamplerEngine:
    """A sampler engine for ``base_model``.

    ``engine="auto"`` reads ``LOOPS_SAMPLER_ENGINE`` (``auto``/``hf``/``vllm``, at call time) and
    otherwise takes vLLM when ``vllm_available()`` (vllm importable and a CUDA GPU), else the HF
    engine. ``"hf"`` and ``"vllm"`` force one. ``kw`` goes to the engine's constructor.
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
        from .sampler_vllm import VLLMSamplerEngine

        return VLLMSamplerEngine(base_model, **kw)
    from .sampler_hf import HFSamplerEngine

    return HFSamplerEngine(base_model, **kw)
