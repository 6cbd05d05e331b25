"""What runs inside a Modal container: the same trainer and sampler servers as ``loops serve``,
configured from environment variables, with checkpoints on a Modal Volume.

This module imports no ``modal``: the container classes in ``app.py`` call ``build_server`` from
their ``@modal.enter()`` hook, and the in-process stand-in (``standin.py``) calls it directly.

The Volume hand-off. A Modal Volume is not a shared disk: a writer's files reach other containers
only after the writer calls ``volume.commit()`` and the reader calls ``volume.reload()``. The
servers read and write checkpoints only through their ``CheckpointStore``, so
``VolumeCheckpointStore`` is the one place that knows: ``create`` (save_state,
save_weights_for_sampler) commits before it returns, which is before the trainer tells the sampler
to load the adapter; ``resolve`` / ``list`` / ``get`` reload first, so the sampler sees what the
trainer committed. No server code changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Protocol

from loops_core.checkpoints import CheckpointStore
from loops_core.types import Checkpoint

from .settings import DEFAULT_VOLUME, POLL_HOLD_S, VOLUME_MOUNT

log = logging.getLogger("loops.modal")
ENV_PREFIX = "LOOPS_MODAL_"


class Volume(Protocol):
    def commit(self) -> None: ...
    def reload(self) -> None: ...


@dataclass(frozen=True)
class ContainerConfig:
    """One container's configuration; it travels as environment variables in a Modal secret."""

    role: str                      # "trainer" | "sampler"
    base_model: str
    run_id: str
    api_key: str | None = None     # required on every route but /health when set
    engine: str = "local"          # "local" (torch/vLLM/HF) | "fake" (numpy)
    sampler_engine: str = "auto"
    rank: int | None = None        # trainer: the LoRA rank; sampler: the largest rank it must load
    seed: int | None = None
    sampler_url: str | None = None  # trainer: where it publishes adapters
    mount: str = VOLUME_MOUNT
    volume: str = DEFAULT_VOLUME
    poll_hold: float = POLL_HOLD_S

    def to_env(self) -> dict[str, str]:
        env = {}
        for k, v in asdict(self).items():
            if v is None:
                continue
            env["LOOPS_API_KEY" if k == "api_key" else ENV_PREFIX + k.upper()] = str(v)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ContainerConfig":
        kw: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("LOOPS_API_KEY" if f.name == "api_key" else ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kw[f.name] = int(raw) if f.name in ("rank", "seed") else float(raw) if f.name == "poll_hold" else raw
        missing = [n for n in ("role", "base_model", "run_id") if n not in kw]
        if missing:
            names = ", ".join(ENV_PREFIX + m.upper() for m in missing)
            raise RuntimeError(f"container configuration incomplete: {names} not set "
                               "(the modal backend passes them as a secret)")
        return cls(**kw)


@dataclass
class ContainerSpec:
    """What the backend asks for: one container with this configuration."""

    app_name: str
    config: ContainerConfig
    gpu: str | None
    scaledown: int
    hf_token: str | None = field(default=None, repr=False)
    detach: bool = False
    output: bool = False

    @property
    def role(self) -> str:
        return self.config.role


class VolumeCheckpointStore(CheckpointStore):
    """A ``CheckpointStore`` on a Modal Volume mounted at ``mount``.

    ``local`` is where the mount is seen from this process: the same path in a real container;
    elsewhere in the stand-in, where each "container" has its own view. Paths the store hands out
    (the adapter directory the trainer sends to its sampler) are in mount terms, so they mean the
    same thing in every container.
    """

    def __init__(self, mount: str = VOLUME_MOUNT, *, volume: Volume | None = None, local: Path | str | None = None):
        self.mount = PurePosixPath(mount)
        self.local = Path(local if local is not None else mount)
        self.volume = volume
        super().__init__(self.local / "runs")

    # ---- commit after writes, reload before reads ---------------------------------------------
    def create(self, run_id: str, kind: str, name: str, **kw: Any) -> tuple[Path, Checkpoint]:
        directory, ckpt = super().create(run_id, kind, name, **kw)
        if self.volume is not None:
            self.volume.commit()  # before the trainer notifies the sampler: it must see these files
        return self._to_mount(directory), ckpt

    def resolve(self, path: str, *, kind: str | None = None) -> Path:
        self.reload()
        return super().resolve(self._to_local(path), kind=kind)

    def list(self, run_id: str) -> list[Checkpoint]:
        self.reload()
        return super().list(run_id)

    def get(self, checkpoint_id: str) -> tuple[Checkpoint, Path]:
        self.reload()
        return super().get(checkpoint_id)

    def reload(self) -> None:
        if self.volume is None:
            return
        try:
            self.volume.reload()
        except Exception as exc:  # Modal refuses while files are open; what is there is still readable
            log.warning("volume reload failed (%s: %s); reading the container's current view",
                        type(exc).__name__, exc)

    # ---- mount <-> local paths (the identity in a real container) ------------------------------
    def _to_mount(self, directory: Path) -> Path:
        try:
            return Path(self.mount / directory.relative_to(self.local))
        except ValueError:
            return directory

    def _to_local(self, path: str) -> str:
        if isinstance(path, str) and path.startswith("/"):
            p = PurePosixPath(path)
            if p == self.mount or self.mount in p.parents:
                return str(self.local / p.relative_to(self.mount))
        return path


# ---- engines ----------------------------------------------------------------------------------
def make_trainer_engine(config: ContainerConfig):  # noqa: ANN201
    rank = config.rank or 32
    if config.engine == "fake":
        from loops_backends.fake.engine import FakeTrainerEngine

        return FakeTrainerEngine(config.base_model, lora_rank=rank, seed=config.seed)
    from loops_backends.local_gpu.tiny_model import TINY_MODEL_NAME
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    engine = TorchTrainerEngine(config.base_model, lora_rank=rank, seed=config.seed)
    if config.base_model == TINY_MODEL_NAME:
        # The engine reports the generated directory, a path inside this container; the client
        # builds the same tokenizer from the name.
        engine.tokenizer_id = TINY_MODEL_NAME
    return engine


def make_sampler_engine(config: ContainerConfig):  # noqa: ANN201
    if config.engine == "fake":
        from loops_backends.fake.engine import FakeSamplerEngine

        return FakeSamplerEngine(config.base_model)
    from loops_backends.local_gpu.samplers import make_sampler_engine as make
    from loops_backends.local_gpu.sampler_vllm import vllm_available

    choice = config.sampler_engine
    if choice == "auto":
        choice = "vllm" if vllm_available() else "hf"
    kw: dict[str, Any] = {}
    if choice == "vllm":
        kw["max_lora_rank"] = max(64, config.rank or 0)  # vLLM must be told the largest rank up front
    return make(config.base_model, engine=choice, **kw)


# ---- servers ----------------------------------------------------------------------------------
def build_server(config: ContainerConfig, *, volume: Volume | None = None,
                 local: Path | str | None = None):  # noqa: ANN201
    """The TrainerServer or SamplerServer for ``config`` (its ``.app`` is the ASGI app to expose)."""
    from loops_core.server.sampler import SamplerServer
    from loops_core.server.trainer import SamplerLink, TrainerServer

    store = VolumeCheckpointStore(config.mount, volume=volume, local=local)
    if config.role == "sampler":
        return SamplerServer(make_sampler_engine(config), store=store, api_key=config.api_key)
    if config.role != "trainer":
        raise RuntimeError(f"unknown container role {config.role!r}")
    link = None
    if config.sampler_url:
        link = SamplerLink(url=config.sampler_url,
                           headers={"Authorization": f"Api-Key {config.api_key}"} if config.api_key else None)
    server = TrainerServer(make_trainer_engine(config), run_id=config.run_id, store=store, sampler=link,
                           seed=config.seed, api_key=config.api_key, poll_hold=config.poll_hold)
    resume_latest(server, store)
    return server


def resume_latest(server: Any, store: CheckpointStore) -> None:
    """After a restart (Modal stopped the idle container, or it was preempted), continue from the
    run's newest save_state on the Volume instead of from a fresh adapter. A new run has none."""
    saved = [c for c in store.list(server.run_id) if c.checkpoint_type == "training"]
    if not saved:
        return
    newest = saved[-1]
    directory = store.dir_for(server.run_id, "weights", newest.checkpoint_id)
    try:
        server.engine.load_state(directory, with_optimizer=True)
    except Exception as exc:
        log.warning("could not resume run %s from %s: %s", server.run_id, newest.path, exc)
        return
    log.warning("resumed run %s from its newest checkpoint %s (in-memory state since then is lost)",
                server.run_id, newest.path)


def container_env_summary(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The loops settings visible in this container, without the API key (for logs)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
