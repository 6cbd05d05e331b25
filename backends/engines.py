"""The built-in engine factories (registered in ``loops_core.builtin_backends``): each takes one
``loops_core.assembly.EngineConfig``. Heavy imports stay inside, so resolving a factory is cheap."""

from __future__ import annotations

from typing import Any


def fake_trainer(config: Any) -> Any:
    from .fake.engine import FakeTrainerEngine

    return FakeTrainerEngine(config.model, lora_rank=config.rank, seed=config.seed)


def fake_sampler(config: Any) -> Any:
    from .fake.engine import FakeSamplerEngine

    return FakeSamplerEngine(config.model)


def torch_trainer(config: Any) -> Any:
    from .local_gpu.trainer import TorchTrainerEngine

    return TorchTrainerEngine(config.model, lora_rank=config.rank, seed=config.seed, device=config.trainer_device)


def torch_sampler(config: Any) -> Any:
    from .local_gpu.samplers import make_sampler_engine

    kw: dict[str, Any] = {}
    if config.sampler_engine == "vllm":  # vLLM-only knobs; otherwise placement.py plans them
        if config.max_lora_rank is not None:
            kw["max_lora_rank"] = config.max_lora_rank
        if config.gpu_memory_share is not None:
            kw["gpu_memory_utilization"] = config.gpu_memory_share
    elif config.sampler_device is not None:
        kw["device"] = config.sampler_device
    return make_sampler_engine(config.model, engine=config.sampler_engine, lora_rank=config.rank,
                               activation_headroom_gb=config.activation_headroom_gb, **kw)
