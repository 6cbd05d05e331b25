"""What the Modal backend is told, read when a ServiceClient is built (never at import).

``ModalSettings`` below, one pydantic-settings model: a keyword to ``ServiceClient(backend="modal",
gpu="A100-80GB")`` wins over the environment variable, which wins over the default. A bad value, or
an unknown keyword, is a ``ConfigurationError`` naming it.

==================  ===========================  =============================================================
option              env                          meaning (default)
==================  ===========================  =============================================================
``gpu``             ``LOOPS_MODAL_GPU``          the trainer's GPU type, as Modal spells it (``H100``)
``sampler_gpu``     ``LOOPS_MODAL_SAMPLER_GPU``  the sampler's GPU type (the trainer's)
``engine``          ``LOOPS_MODAL_ENGINE``       ``local`` (torch + vLLM/HF) or ``fake`` (numpy, CPU only) (``local``)
``sampler_engine``  ``LOOPS_SAMPLER_ENGINE``     ``auto`` (vLLM, else HF), ``hf`` or ``vllm`` (``auto``)
``scaledown``       ``LOOPS_MODAL_SCALEDOWN``    seconds an idle container is kept before Modal stops it, 2..3600 (900)
``detach``          ``LOOPS_MODAL_DETACH``       keep the apps running after this process ends (off)
``output``          ``LOOPS_MODAL_OUTPUT``       show Modal's build and container logs here (off)
``volume``          ``LOOPS_MODAL_VOLUME``       the checkpoint Volume's name (``loops-checkpoints``)
``hf_token``        ``HF_TOKEN`` or              a Hugging Face token, passed to the containers as a Modal secret,
                    ``HUGGING_FACE_HUB_TOKEN``   for gated models (none)
==================  ===========================  =============================================================

A GPU value may list fallbacks, ``"H100,A100-80GB"``: Modal takes the first type it can get. With
``engine="fake"`` both GPUs are None (the numpy engine runs on cheap CPU containers). An empty
variable counts as unset; ``engine`` and ``sampler_engine`` are case-insensitive; the flags take
``1/0``, ``true/false``, ``yes/no``, ``on/off``.
``LOOPS_MODAL_VLLM_SPEC`` overrides the sampler image's vLLM requirement (``vllm==0.33.0``).
Tests: ``LOOPS_MODAL_CONTRACT=real`` runs the contract suite on real Modal instead of the fake
control plane (``fake_control_plane.FakeModal``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loops_core.errors import AuthenticationError
from loops_core.settings import load_settings

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


class ModalSettings(BaseSettings):
    """Options of the Modal backend: keyword > ``LOOPS_MODAL_*`` environment > default."""

    # ``populate_by_name``: the fields whose variable does not follow the prefix (``validation_alias``)
    # still take their keyword by name; ``extra="forbid"``: an unknown keyword is an error, not ignored.
    model_config = SettingsConfigDict(env_prefix="LOOPS_MODAL_", extra="forbid", env_ignore_empty=True,
                                      populate_by_name=True)

    gpu: str | None = Field(DEFAULT_GPU, description=(
        "the trainer's GPU type, as Modal spells it; may list fallbacks, 'H100,A100-80GB'"))
    sampler_gpu: str | None = Field(None, description="the sampler's GPU type (default: the trainer's)")
    engine: Literal["local", "fake"] = Field("local", description=(
        "local: torch + vLLM/HF on GPUs; fake: the numpy engine on CPU containers (tests of provisioning)"))
    sampler_engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", validation_alias="LOOPS_SAMPLER_ENGINE",
        description="the sampler's engine: auto (vLLM when it imports, else HF), hf or vllm")
    scaledown: int = Field(DEFAULT_SCALEDOWN_S, ge=2, le=3600, description=(
        "seconds an idle container is kept before Modal stops it (Modal's scaledown_window: 2..3600)"))
    detach: bool = Field(False, description=(
        "keep the apps running after this process ends (for reuse_from_session_id)"))
    output: bool = Field(False, description="show Modal's build and container logs in this process")
    volume: str = Field(DEFAULT_VOLUME, min_length=1, description="the name of the checkpoint Volume")
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
        description="a Hugging Face token for gated models, passed to the containers as a Modal secret")

    @field_validator("engine", "sampler_engine", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _gpus(self) -> "ModalSettings":
        if self.sampler_gpu is None:
            self.sampler_gpu = self.gpu
        if self.engine == "fake":  # the numpy engine needs no GPU: cheap CPU containers
            self.gpu = self.sampler_gpu = None
        return self

    def hf_token_value(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token is not None else None


def modal_settings(**options: Any) -> ModalSettings:
    """The settings for ``ServiceClient(backend="modal", **options)``, read from the environment now."""
    return load_settings(ModalSettings, **options)  # type: ignore[return-value]


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
