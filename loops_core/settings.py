"""The SDK's own settings: keyword > environment (``LOOPS_*``) > default, read when a client is
built (never at import), validated by pydantic-settings so a bad value names its variable.

Each backend has a settings model of its own, built the same way, for its options.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOPS_", extra="ignore", env_ignore_empty=True)

    backend: str = Field("local", description="backend name: fake, local, modal, baseten, or a plugin's")
    api_key: SecretStr | None = Field(None, description="API key sent to loops servers (ServiceClient.local)")
    unreachable_timeout: float = Field(30.0, gt=0, description=(
        "seconds a steady-state call waits for a server it cannot reach before raising APIConnectionError"))
    reuse_from_session_id: str | None = Field(None, description="reuse a prior session's trainer and sampler")


def load_settings(model: type[BaseSettings], **overrides: object) -> BaseSettings:
    """``model`` from the environment, with explicit (non-None) keywords on top; a bad value is a
    ``ConfigurationError`` naming the keyword or variable."""
    try:
        return model(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))} (or {' or '.join(env_names(model, str(e['loc'][0])))}): "
                             f"{e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid {model.__name__}: {problems}") from None


def env_names(model: type[BaseSettings], name: str) -> list[str]:
    """The environment variable(s) a field is read from: its alias(es), else prefix + name."""
    field = model.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    choices = getattr(alias, "choices", None) or ([alias] if isinstance(alias, str) else [])
    names = [c.upper() for c in choices if isinstance(c, str)]
    return names or [f"{model.model_config.get('env_prefix', '')}{name}".upper()]


def client_settings(**overrides: object) -> ClientSettings:
    return load_settings(ClientSettings, **overrides)  # type: ignore[return-value]
