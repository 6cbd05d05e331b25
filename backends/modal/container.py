"""What runs inside a Modal container: the same trainer and sampler servers as ``loops serve``,
configured from environment variables, with checkpoints on a Modal Volume.

This module imports no ``modal``: the container classes in ``app.py`` call ``build_server`` from
their ``@modal.enter()`` hook (``app.serve_container``), which the fake control plane calls too.

The Volume hand-off (commit after writes, reload before reads, off the event loop) is in
``volume.py``. Two things here exist because the servers run behind Modal's web proxy: a server
that cannot start answers with its error (``FailedServer``), and the trainer's publish to its
sampler follows the proxy's 303 (``FollowRedirects``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import httpx

from loops_core.checkpoints import CheckpointStore

from .settings import DEFAULT_VOLUME, POLL_HOLD_S, VOLUME_MOUNT
from .volume import PublishedJournal, Volume, VolumeCheckpointStore, VolumeSyncMiddleware

log = logging.getLogger("loops.modal")
ENV_PREFIX = "LOOPS_MODAL_"


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


# ---- engines ----------------------------------------------------------------------------------
def engine_config(config: ContainerConfig) -> Any:
    """The container's engines, described as everywhere else (``loops_core.assembly``)."""
    from loops_core.assembly import EngineConfig

    return EngineConfig(model=config.base_model, engine=config.engine, sampler_engine=config.sampler_engine,
                        rank=config.rank or 32, seed=config.seed)


def make_trainer_engine(config: ContainerConfig):  # noqa: ANN201
    from loops_core.assembly import make_engines

    engine = make_engines(engine_config(config))[0]()
    if config.base_model == "loops/tiny-qwen3":
        # The engine reports the generated directory, a path inside this container; the client
        # builds the same tokenizer from the name.
        engine.tokenizer_id = config.base_model
    return engine


def make_sampler_engine(config: ContainerConfig):  # noqa: ANN201
    from loops_core.assembly import make_engines

    return make_engines(engine_config(config))[1]()


# ---- servers ----------------------------------------------------------------------------------
def build_server(config: ContainerConfig, *, volume: Volume | None = None,
                 local: Path | str | None = None):  # noqa: ANN201
    """The TrainerServer or SamplerServer for ``config`` (its ``.app`` is the ASGI app to expose)."""
    from loops_core.server.sampler import SamplerServer
    from loops_core.server.trainer import TrainerServer
    from loops_core.wire import Endpoint

    store = VolumeCheckpointStore(config.mount, volume=volume, local=local)
    store.reload()  # a new container sees what was committed before it started
    if config.role == "sampler":
        server = SamplerServer(make_sampler_engine(config), store=store, api_key=config.api_key)
        stamp = server.app if hasattr(server.app, "value") else None  # loops_core's IncarnationMiddleware
        server.app = VolumeSyncMiddleware(server.app, store, "sampler", api_key=config.api_key, stamp=stamp,
                                          journal=PublishedJournal(store, config.run_id))
        return server
    if config.role != "trainer":
        raise RuntimeError(f"unknown container role {config.role!r}")
    link = None
    if config.sampler_url:
        link = Endpoint(url=config.sampler_url, transport=FollowRedirects(),
                        headers={"Authorization": f"Api-Key {config.api_key}"} if config.api_key else {})
    # A new TrainerServer per container draws a new incarnation id: clients see a restarted trainer.
    server = TrainerServer(make_trainer_engine(config), run_id=config.run_id, store=store, sampler=link,
                           seed=config.seed, api_key=config.api_key, poll_hold=config.poll_hold)
    resume_latest(server, store)
    server.app = VolumeSyncMiddleware(server.app, store, "trainer")
    return server


class FollowRedirects(httpx.AsyncBaseTransport):
    """A transport that follows redirects: Modal answers a web request that runs past 150 s with a
    303 to the same URL plus ``__modal_function_call_id``, whose GET waits for the result. Without
    this, the trainer counted the 303 as a successful publish."""

    REDIRECTS = (301, 302, 303, 307, 308)

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None, max_hops: int = 50):
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.max_hops = max_hops

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(self.max_hops):
            response = await self.inner.handle_async_request(request)
            location = response.headers.get("location")
            if response.status_code not in self.REDIRECTS or not location:
                return response
            await response.aread()
            await response.aclose()
            as_get = response.status_code == 303 and request.method != "GET"
            headers = [(k, v) for k, v in request.headers.multi_items()
                       if not (as_get and k.lower() in ("content-length", "content-type"))]
            request = httpx.Request("GET" if as_get else request.method, request.url.join(location),
                                    headers=headers, content=None if as_get else request.content,
                                    extensions=request.extensions)
        raise httpx.TooManyRedirects(f"more than {self.max_hops} redirects", request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FailedServer:
    """What a container serves when its server could not be built: every route, ``/health``
    included, answers 503 with the error, so the client reports it at once."""

    def __init__(self, role: str, error: BaseException):
        self.role = role
        self.error = f"{type(error).__name__}: {error}"
        self.shutting_down = True

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        from starlette.responses import JSONResponse

        await JSONResponse({"status": "failed", "role": self.role, "detail": f"the {self.role} could not start: "
                            f"{self.error}"}, 503)(scope, receive, send)


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
