"""The Modal app: images, the checkpoint Volume, and the trainer and sampler container classes.

One ephemeral app per container (``loops-<session>-<n>-trainer`` / ``-sampler``), built when the
backend provisions, so the GPU type and the configuration are read at call time::

    LoopsSampler   image: vLLM (+ peft for the HF fallback)   gpu: LOOPS_MODAL_SAMPLER_GPU
    LoopsTrainer   image: torch + transformers + peft         gpu: LOOPS_MODAL_GPU (H100)
        both: the project's source (loops_core, loops_backends) added to the image; the
        ``loops-checkpoints`` Volume at /loops-volume; the HF cache Volume at HF_HOME;
        one container at most (the state lives in its memory), many requests at once
        (long-polls wait beside submits); the configuration, API key included, as a secret.

Each class starts the server in ``@modal.enter()`` (``container.build_server``: the same
``TrainerServer`` / ``SamplerServer`` as ``loops serve``) and exposes its ASGI app with
``@modal.asgi_app()``. The sampler app starts first; its URL goes into the trainer's
configuration, so the trainer publishes adapters to it (``/v1/load_lora_adapter``) even after a
restart. The classes are module-level and undecorated until ``build_app`` applies ``app.cls``:
Modal's container runtime imports this module and finds them by name.

``LoopsTrainer().web.local()`` (Modal's local execution path) runs the enter hook and returns the
ASGI app in this process, without a Modal account; the Volume is not mounted there, so the store
then lives under ``$LOOPS_HOME/modal-local-volume``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import modal

from loops_core.checkpoints import loops_home

from .container import ContainerConfig, ContainerSpec, FailedServer, build_server, container_env_summary
from .settings import DEFAULT_VOLUME, HF_CACHE_MOUNT, HF_CACHE_VOLUME, VOLUME_MOUNT

log = logging.getLogger("loops.modal")

MAX_INPUTS = 256            # concurrent requests per container (the client opens up to 256 connections)
REQUEST_TIMEOUT_S = 3600    # one request's execution (web requests are cut at 150 s by Modal's proxy anyway)
STARTUP_TIMEOUT_S = 1800    # @enter: image pull + model download + load; big models take minutes
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# The versions the project tests, pinned in the images so that a container runs what CI ran
# (vLLM: the GPU issue's choice; it pins its own torch and transformers in the sampler image).
TESTED = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "tokenizers": "0.23.3", "vllm": "0.33.0"}
FALLBACK_CORE = ["pydantic>=2.6", "httpx>=0.27", "pluggy>=1.3", "numpy>=1.26", "safetensors>=0.4",
                 "starlette>=0.37", "uvicorn>=0.29", "tqdm>=4.66"]


# ---- images -----------------------------------------------------------------------------------
def requirements() -> list[str]:
    """The installed distribution's core requirements (from its metadata, so the image follows
    pyproject.toml)."""
    try:
        reqs = importlib.metadata.requires("loops") or []
    except importlib.metadata.PackageNotFoundError:
        return list(FALLBACK_CORE)
    return [r.strip() for r in reqs if ";" not in r]


def pinned(*names: str) -> list[str]:
    return [f"{n}=={TESTED[n]}" for n in names]


def image_packages(role: str, engine: str) -> list[str]:
    """What pip installs in ``role``'s image: the core, and the engine's stack at the tested versions."""
    pkgs = requirements()
    if engine == "fake":
        return pkgs
    if role == "trainer":
        return [*pkgs, *pinned("torch", "transformers", "peft", "tokenizers")]
    # vLLM brings its own torch and transformers; peft serves the HF fallback and LoRA loading.
    vllm = os.environ.get("LOOPS_MODAL_VLLM_SPEC") or f"vllm=={TESTED['vllm']}"
    return [*pkgs, vllm, *pinned("peft")]


def image(role: str, engine: str) -> modal.Image:
    return (modal.Image.debian_slim(python_version=PYTHON)
            .uv_pip_install(*image_packages(role, engine))
            .env({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
            # last, so that editing loops does not rebuild the layers above
            .add_local_python_source("loops_core", "loops_backends"))


# ---- the container classes --------------------------------------------------------------------
def serve_container(role: str, env: Mapping[str, str], *, volume: Any = None, local: Any = None,
                    fail: str | None = None) -> Any:
    """What a container's ``@modal.enter()`` does: the server for ``role`` from ``env`` (the secret),
    with checkpoints on ``volume``. The fake control plane calls it too, with the function's secret
    and a view of its Volume (``fail`` scripts an error here).

    A server that cannot be built is replaced by ``FailedServer``, which answers every request with
    the error: raising instead would crash the container, and Modal would start it again (another
    GPU cold start, each failing the same way) while the client waits for ``/health``."""
    try:
        if fail:
            raise RuntimeError(fail)
        config = ContainerConfig.from_env(env)
        if config.role != role:
            raise RuntimeError(f"the {role} container was given a {config.role} configuration")
        log.warning("loops %s starting: %s", role, container_env_summary(env))
        return build_server(config, volume=volume, local=local)
    except Exception as exc:
        log.exception("loops %s failed to start", role)
        return FailedServer(role, exc)


def _start(role: str) -> Any:
    name = os.environ.get("LOOPS_MODAL_VOLUME") or DEFAULT_VOLUME
    if modal.is_local():  # Function.local(): no Volume is mounted in this process
        return serve_container(role, os.environ, local=loops_home() / "modal-local-volume")
    return serve_container(role, os.environ, volume=modal.Volume.from_name(name))


def _stop(server: Any) -> None:
    if hasattr(server, "close"):
        server.close()
    else:
        server.shutting_down = True


class _LoopsServer:
    """One server per container: built on enter, served as the ASGI web endpoint, closed on exit.
    (Modal collects the decorated methods along the class's MRO, so subclasses inherit them.)"""

    role: str

    @modal.enter()
    def start(self) -> None:
        self.server = _start(self.role)

    @modal.asgi_app()
    def web(self) -> Any:
        return self.server.app

    @modal.exit()
    def stop(self) -> None:
        _stop(self.server)


class LoopsTrainer(_LoopsServer):
    """The trainer server of one run."""

    role = "trainer"


class LoopsSampler(_LoopsServer):
    """A sampler server: the trainer's pair, or a standalone one."""

    role = "sampler"


# ---- one app per container ----------------------------------------------------------------------
@dataclass
class BuiltApp:
    app: modal.App
    cls: Any           # the modal.Cls
    options: dict      # what went to app.cls(...)


def build_app(spec: ContainerSpec) -> BuiltApp:
    """A Modal app holding one trainer or sampler class, configured by ``spec``."""
    app = modal.App(spec.app_name)
    volumes: dict[str, Any] = {VOLUME_MOUNT: modal.Volume.from_name(spec.config.volume, create_if_missing=True)}
    if spec.config.engine != "fake":
        volumes[HF_CACHE_MOUNT] = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
    secrets = [modal.Secret.from_dict(spec.config.to_env())]
    if spec.hf_token:
        secrets.append(modal.Secret.from_dict({"HF_TOKEN": spec.hf_token}))
    gpu: str | list[str] | None = spec.gpu
    if gpu and "," in gpu:  # "H100,A100-80GB": Modal takes the first type it can get
        gpu = [g.strip() for g in gpu.split(",") if g.strip()]
    options = dict(image=image(spec.role, spec.config.engine), gpu=gpu, volumes=volumes, secrets=secrets,
                   scaledown_window=spec.scaledown, timeout=REQUEST_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
                   max_containers=1)
    user_cls = LoopsTrainer if spec.role == "trainer" else LoopsSampler
    cls = app.cls(**options)(modal.concurrent(max_inputs=MAX_INPUTS)(user_cls))
    return BuiltApp(app=app, cls=cls, options=options)
