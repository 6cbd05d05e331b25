"""What the Modal backend is told, read when a ServiceClient is built (never at import).

Options (``ServiceClient(backend="modal", gpu="A100-80GB")``) win over environment variables:

=================  ==========================  ============================================================
option             env                         meaning (default)
=================  ==========================  ============================================================
``gpu``            ``LOOPS_MODAL_GPU``         the trainer's GPU type, as Modal spells it (``H100``)
``sampler_gpu``    ``LOOPS_MODAL_SAMPLER_GPU`` the sampler's GPU type (the trainer's)
``engine``         ``LOOPS_MODAL_ENGINE``      ``local`` (torch + vLLM/HF) or ``fake`` (numpy, CPU only)
``sampler_engine`` ``LOOPS_SAMPLER_ENGINE``    ``auto`` (vLLM, else HF), ``hf`` or ``vllm``
``scaledown``      ``LOOPS_MODAL_SCALEDOWN``   seconds an idle container is kept before Modal stops it (900)
``detach``         ``LOOPS_MODAL_DETACH``      keep the apps running after this process ends (off)
``output``         ``LOOPS_MODAL_OUTPUT``      show Modal's build and container logs here (off)
``volume``         ``LOOPS_MODAL_VOLUME``      the checkpoint Volume's name (``loops-checkpoints``)
=================  ==========================  ============================================================

A GPU value may list fallbacks, ``"H100,A100-80GB"``: Modal takes the first type it can get.
``HF_TOKEN`` (when set) reaches the containers as a Modal secret, for gated models.
``LOOPS_MODAL_VLLM_SPEC`` overrides the sampler image's vLLM requirement (``vllm==0.33.0``).
Tests: ``LOOPS_MODAL_CONTRACT=real`` runs the contract suite on real Modal instead of the fake
control plane (``fake_control_plane.FakeModal``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from loops_core.errors import AuthenticationError, InvalidRequestError

DEFAULT_GPU = "H100"
# GPU types Modal offers (``gpu=`` strings); listed by get_server_capabilities.
GPU_CLASSES = ("T4", "L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "B200")
DEFAULT_VOLUME = "loops-checkpoints"
HF_CACHE_VOLUME = "loops-hf-cache"
VOLUME_MOUNT = "/loops-volume"               # the checkpoint Volume, at the same path in every container
HF_CACHE_MOUNT = "/root/.cache/huggingface"  # HF_HOME's default: weights survive cold starts
SESSIONS_DICT = "loops-sessions"             # modal.Dict: session id -> the pairs it started (for reuse)
# Modal answers any web request that runs past 150 s with a 303 to a result URL; a long-poll that
# holds 25 s stays far below that, and below the client's 35 s poll read timeout.
POLL_HOLD_S = 25.0
DEFAULT_SCALEDOWN_S = 900
ENGINES = ("local", "fake")
SAMPLER_ENGINES = ("auto", "hf", "vllm")
OPTIONS = ("gpu", "sampler_gpu", "engine", "sampler_engine", "scaledown", "detach", "output", "volume")


@dataclass(frozen=True)
class ModalSettings:
    gpu: str | None
    sampler_gpu: str | None
    engine: str = "local"
    sampler_engine: str = "auto"
    scaledown: int = DEFAULT_SCALEDOWN_S
    detach: bool = False
    output: bool = False
    volume: str = DEFAULT_VOLUME
    hf_token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, options: Mapping[str, Any], env: Mapping[str, str] | None = None) -> "ModalSettings":
        env = os.environ if env is None else env
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidRequestError(f"unknown option(s) for the modal backend: {', '.join(unknown)}; "
                                      f"known: {', '.join(OPTIONS)}", field=unknown[0])

        def pick(key: str, var: str, default: Any) -> Any:
            value = options.get(key)
            return value if value is not None else (env.get(var) or default)

        engine = str(pick("engine", "LOOPS_MODAL_ENGINE", "local")).lower()
        if engine not in ENGINES:
            raise InvalidRequestError(f"engine={engine!r}: expected one of {ENGINES}", field="engine")
        sampler_engine = str(pick("sampler_engine", "LOOPS_SAMPLER_ENGINE", "auto")).lower()
        if sampler_engine not in SAMPLER_ENGINES:
            raise InvalidRequestError(f"sampler_engine={sampler_engine!r}: expected one of {SAMPLER_ENGINES}",
                                      field="sampler_engine")
        try:
            scaledown = int(pick("scaledown", "LOOPS_MODAL_SCALEDOWN", DEFAULT_SCALEDOWN_S))
        except (TypeError, ValueError):
            raise InvalidRequestError("scaledown must be a whole number of seconds", field="scaledown") from None
        if not 2 <= scaledown <= 3600:  # Modal's bounds for scaledown_window
            raise InvalidRequestError(f"scaledown={scaledown}: Modal accepts 2..3600 seconds", field="scaledown")
        gpu = pick("gpu", "LOOPS_MODAL_GPU", DEFAULT_GPU)
        sampler_gpu = pick("sampler_gpu", "LOOPS_MODAL_SAMPLER_GPU", gpu)
        if engine == "fake":  # the numpy engine needs no GPU: cheap CPU containers
            gpu = sampler_gpu = None
        return cls(gpu=gpu, sampler_gpu=sampler_gpu, engine=engine, sampler_engine=sampler_engine,
                   scaledown=scaledown, detach=_flag(pick("detach", "LOOPS_MODAL_DETACH", False)),
                   output=_flag(pick("output", "LOOPS_MODAL_OUTPUT", False)),
                   volume=str(pick("volume", "LOOPS_MODAL_VOLUME", DEFAULT_VOLUME)),
                   hf_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def modal_credentials_present() -> bool:
    """Whether the modal client will find credentials, asked of modal's own configuration lookup
    (``MODAL_TOKEN_ID`` / ``MODAL_TOKEN_SECRET``, else the active profile of ``~/.modal.toml`` or
    ``MODAL_CONFIG_PATH``, as ``MODAL_PROFILE`` picks it; or the OAuth settings), so that this check
    accepts and refuses exactly what ``modal.Client.from_env`` does."""
    from modal.config import config

    if config.get("token_id") and config.get("token_secret"):
        return True
    return bool(config.get("oauth_refresh_token") and config.get("oauth_client_id")
                and (config.get("oauth_client_secret") or config.get("oauth_jwt_key")))


def require_credentials() -> None:
    if not modal_credentials_present():
        raise AuthenticationError(
            "The modal backend found no Modal credentials (no MODAL_TOKEN_ID / MODAL_TOKEN_SECRET in the "
            "environment and no token in the active profile of ~/.modal.toml). Run `modal token new` once (it "
            "opens a browser and writes ~/.modal.toml), or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET. To try the "
            "backend without an account, run it against loops_backends.modal.fake_control_plane.FakeModal().active().")
