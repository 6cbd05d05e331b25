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
    if config.sampler_engine == "vllm":
        kw["max_lora_rank"] = config.sampler_max_lora_rank
        if config.gpu_memory_share is not None:
            kw["gpu_memory_utilization"] = config.gpu_memory_share
    return make_sampler_engine(config.model, engine=config.sampler_engine, **kw)
