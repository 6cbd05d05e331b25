"""One typed description of the engines behind a trainer + sampler pair, and the one way to build
them: ``loops serve``, the local backend's server processes, the fake backend's in-process servers,
Modal containers and the Baseten emulator all go through ``make_engines``.

Engine families are registered through the ``register_engines`` hook (the built-in ``fake`` and
``local`` the same way as a plugin's), so this module imports no backend.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigurationError


class EngineConfig(BaseModel):
    """Everything an engine factory may need. Fields an engine family does not use are ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="base model: loops/tiny-qwen3, an HF id or a local directory")
    engine: str = Field("local", description="engine family: fake, local, or a plugin's")
    sampler_engine: Literal["auto", "hf", "vllm"] = "auto"
    rank: int = Field(32, ge=1, description="LoRA rank of the first run")
    seed: int | None = None
    trainer_device: str | None = Field(None, description="e.g. cuda:0; default: the first GPU, else CPU")
    sampler_device: str | None = Field(None, description="e.g. cuda:1; default: as planned for the GPUs present")
    gpu_memory_share: float | None = Field(None, gt=0, le=1, description=(
        "share of the sampler GPU's memory vLLM may take; default: planned from what the trainer left free"))
    max_lora_rank: int | None = Field(None, ge=1, description="largest adapter rank the sampler accepts")
    activation_headroom_gb: float | None = Field(None, gt=0, description=(
        "GPU memory kept free for the trainer's activations when the sampler shares its GPU"))


def engine_families() -> dict[str, tuple[Any, Any]]:
    """Registered (trainer factory, sampler factory) by family name; the first registration wins."""
    from .plugins import registrations

    found: dict[str, tuple[Any, Any]] = {}
    for name, trainer, sampler in registrations("register_engines"):
        found.setdefault(name, (trainer, sampler))
    return found


def make_engines(config: EngineConfig) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(make the trainer engine, make the sampler engine) for ``config``: the factories resolve
    now (a missing extra fails here), the engines load when called."""
    families = engine_families()
    if config.engine not in families:
        raise ConfigurationError(f"unknown engine {config.engine!r}; registered: {', '.join(sorted(families))}")
    from .plugins import resolve_target

    trainer, sampler = (resolve_target(t) for t in families[config.engine])
    return (lambda: trainer(config)), (lambda: sampler(config))


def in_process_pair(config: EngineConfig, *, run_id: str, store: Any = None, api_key: str | None = None,
                    publish_token: str | None = None, poll_hold: float = 30.0, max_runs: int = 64,
                    max_resident: int = 16) -> tuple[Any, Any]:
    """A trainer and a sampler server in this process, the trainer publishing to the sampler
    through the ASGI transport (no socket between them). The trainer's engine loads first: on one
    GPU the sampler plans its memory share from what the trainer left."""
    import httpx

    from .server.sampler import SamplerServer
    from .server.trainer import TrainerServer
    from .wire import Endpoint

    make_trainer, make_sampler = make_engines(config)
    trainer_engine = make_trainer()
    sampler = SamplerServer(make_sampler(), store=store, api_key=api_key, max_resident=max_resident)
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
    if publish_token:  # only this trainer may move the sampler's versions
        sampler.publish_token = publish_token
        headers["X-Loops-Publish-Token"] = publish_token
    link = Endpoint(url="http://paired-sampler", transport=httpx.ASGITransport(app=sampler.app), headers=headers)
    trainer = TrainerServer(trainer_engine, run_id=run_id, store=store, sampler=link, seed=config.seed,
                            api_key=api_key, poll_hold=poll_hold, max_runs=max_runs)
    return trainer, sampler
