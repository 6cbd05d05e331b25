"""Typed, strict request models for every POST route, checked before anything is queued.

The guard in ``http.py`` decodes a body (size, UTF-8, JSON, nesting and lone surrogates checked
there), then validates it with the route's model below. The models are strict (no ``true`` or
``"1"`` taken as a number), refuse NaN and infinities, and bound everything that sizes work: ``n``,
``max_tokens``, datums per call, tokens per call, loss-input magnitudes. Unknown fields are ignored,
so every field the published client sends (``model``, ``seq_id``, ``run_id``,
``routed_experts_ref``, ...) is accepted. The route handlers still do their own semantic checks
(loss names, vocabulary, checkpoint names); these models guarantee they only ever see sane types.

Limits come from ``Limits`` (``LOOPS_MAX_*`` environment variables, read when a server is built) and the engine's
``vocab_size`` / ``max_seq_len``, passed as validation context.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..types import AdamParams, Datum

_FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
_I64 = 2**63


class Limits(BaseSettings):
    """What one request may ask of a server, and what a server keeps. Each field can be set with
    ``LOOPS_<FIELD>`` (upper case), e.g. ``LOOPS_MAX_BODY_BYTES``."""

    model_config = SettingsConfigDict(env_prefix="LOOPS_", extra="ignore", frozen=True)

    max_body_bytes: int = Field(64 << 20, gt=0, description="request body limit (an RL batch of 128 x "
                                "4k-token datums is ~30 MB of JSON)")
    max_json_depth: int = Field(32, gt=1, description="nesting depth of a request body")
    max_datums: int = Field(4096, gt=0, description="datums per forward / forward_backward call")
    max_tokens_per_call: int = Field(1 << 21, gt=0, description="input tokens summed over a call's datums")
    max_abs_loss_input: float = Field(1e9, gt=0, description="largest |value| in loss inputs (beyond it, "
                                      "float32 gradients overflow)")
    max_n: int = Field(1024, gt=0, description="samples per /sample call")
    max_sample_tokens: int = Field(1 << 21, gt=0, description="n * (prompt + max_tokens) per /sample call")
    max_lora_rank: int = Field(4096, gt=0)
    max_result_bytes: int = Field(128 << 20, gt=0, description="finished results kept, as JSON bytes "
                                  "(Python objects take ~1.6x that in RSS); oldest dropped first")
    max_adhoc_adapters: int = Field(8, gt=0, description="adapters a sampler keeps loaded by path (LRU)")
    shutdown_timeout_s: float = Field(120.0, ge=0, description="on SIGTERM: how long running work may finish")
    drain_s: float = Field(10.0, ge=0, description="then: how long polls are still answered")

    @classmethod
    def from_env(cls) -> "Limits":
        from ..settings import load_settings

        return load_settings(cls)  # type: ignore[return-value]


def _ctx(info: ValidationInfo) -> dict[str, Any]:
    return info.context or {}


def _limits(info: ValidationInfo) -> Limits:
    return _ctx(info).get("limits") or Limits.from_env()


class WireRequest(BaseModel):
    """Base of every request model: strict types, finite floats, unknown fields ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


U63 = Annotated[int, Field(ge=0, lt=_I64)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]


class Sequenced(WireRequest):
    seq_id: Optional[U63] = None


# ---- trainer ------------------------------------------------------------------------------------
class InitTrainerRequest(Sequenced):
    lora_rank: Annotated[int, Field(gt=0)]
    seed: Optional[U63] = None

    @field_validator("lora_rank")
    @classmethod
    def _rank(cls, v: int, info: ValidationInfo) -> int:
        cap = _limits(info).max_lora_rank
        if v > cap:
            raise ValueError(f"lora_rank must be at most {cap}")
        return v


class ForwardBackwardRequest(Sequenced):
    data: Annotated[list[Any], Field(min_length=1)]
    loss_fn: Optional[Annotated[str, Field(max_length=64)]] = None
    loss_fn_config: Optional[dict[Annotated[str, Field(max_length=64)], float]] = None

    @field_validator("data")
    @classmethod
    def _data(cls, raw: list[Any], info: ValidationInfo) -> list[Any]:
        lim = _limits(info)
        if len(raw) > lim.max_datums:
            raise ValueError(f"at most {lim.max_datums} datums per call, got {len(raw)}; split the batch")
        # The handler parses Datum again; here only the strictness and the sizes matter.
        total = 0
        for i, d in enumerate(raw):
            datum = _strict_datum(i, d)
            n = datum.model_input.length
            total += n
            if total > lim.max_tokens_per_call:
                raise ValueError(f"the call holds more than {lim.max_tokens_per_call} input tokens "
                                 f"(reached at data[{i}]); split the batch")
            for key, td in datum.loss_fn_inputs.items():
                _check_tensor(f"data[{i}].loss_fn_inputs.{key}", td.data, td.dtype, lim.max_abs_loss_input)
        return raw


def _strict_datum(i: int, d: Any) -> Datum:
    from pydantic import ValidationError

    try:
        return Datum.model_validate(d, strict=True)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e["loc"] if "[" not in str(p) or "." in str(p))
        raise ValueError(f"data[{i}]{'.' + loc if loc else ''}: {e['msg']}") from None


def _check_tensor(where: str, values: list[Any], dtype: str, bound: float) -> None:
    if dtype in _FLOAT_DTYPES:
        for v in values:
            if type(v) is not float and type(v) is not int:
                raise ValueError(f"{where} holds {_short(v)}; loss inputs must be finite numbers (no null)")
            if not -bound <= v <= bound:  # also false for NaN
                raise ValueError(f"{where} holds {_short(v)}; loss inputs must be finite and within ±{bound:g}")
    else:
        for v in values:
            if type(v) is not int or not -_I64 <= v < _I64:
                raise ValueError(f"{where} holds {_short(v)}; a {dtype} tensor holds integers only")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


class StrictAdam(WireRequest):
    learning_rate: Annotated[float, Field(ge=0, le=1e3)] = 1e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    eps: Annotated[float, Field(gt=0, le=1)] = 1e-12
    weight_decay: Annotated[float, Field(ge=0, le=1e3)] = 0.0
    grad_clip_norm: Annotated[float, Field(ge=0)] = 1.0


class OptimStepRequest(Sequenced):
    adam_params: StrictAdam

    @model_validator(mode="after")
    def _same_as_client_type(self) -> "OptimStepRequest":
        AdamParams.model_validate(self.adam_params.model_dump())  # the handler's own type accepts it too
        return self


class SaveRequest(Sequenced):
    name: Optional[Name] = None
    ttl_seconds: Optional[Union[int, float]] = None
    bump_version: Optional[bool] = None


class LoadRequest(Sequenced):
    path: PathStr


# ---- sampler ------------------------------------------------------------------------------------
class SampleRequest(WireRequest):
    prompt: Union[list[TokenId], list[list[TokenId]]]
    n: Optional[Annotated[int, Field(ge=1)]] = None
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=1e3)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, lt=2**31)]] = None
    seed: Optional[U63] = None
    stop: Optional[Union[Annotated[str, Field(max_length=1024)], list[Annotated[str, Field(max_length=1024)]],
                         list[TokenId]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: Optional[bool] = None
    prompt_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: list[Any]) -> list[Any]:
        if v and isinstance(v[0], list) and len(v) != 1:
            raise ValueError("prompt must be one list of token ids (a batch of prompts is not supported)")
        return v

    @field_validator("stop", "stop_token_ids")
    @classmethod
    def _few_stops(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 1024:
            raise ValueError("at most 1024 stop entries")
        return v

    @model_validator(mode="after")
    def _work(self, info: ValidationInfo) -> "SampleRequest":
        lim = _limits(info)
        n = self.n or 1
        if n > lim.max_n:
            raise ValueError(f"n={n} is more than this server's {lim.max_n} samples per call; split the request")
        prompt = self.prompt[0] if self.prompt and isinstance(self.prompt[0], list) else self.prompt
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        ctx = _ctx(info).get("max_seq_len")
        if ctx is not None and len(prompt) + max_tokens > ctx:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"{ctx} tokens")
        work = n * (len(prompt) + max_tokens)
        if work > lim.max_sample_tokens:
            raise ValueError(f"n * (prompt + max_tokens) = {work} tokens is more than this server's "
                             f"{lim.max_sample_tokens} per call; lower n or max_tokens")
        return self


class LoadAdapterRequest(WireRequest):
    lora_name: Name
    lora_path: PathStr
    policy_version: Optional[Annotated[int, Field(ge=1, lt=2**53)]] = None


class UnloadAdapterRequest(WireRequest):
    lora_name: Name


TRAINER_REQUESTS: dict[str, type[WireRequest]] = {
    "/init_trainer_server": InitTrainerRequest,
    "/forward_backward": ForwardBackwardRequest,
    "/forward": ForwardBackwardRequest,
    "/optim_step": OptimStepRequest,
    "/save_state": SaveRequest,
    "/save_weights_for_sampler": SaveRequest,
    "/load_state": LoadRequest,
    "/load_state_with_optimizer": LoadRequest,
}
SAMPLER_REQUESTS: dict[str, type[WireRequest]] = {
    "/sample": SampleRequest,
    "/v1/completions": SampleRequest,
    "/v1/load_lora_adapter": LoadAdapterRequest,
    "/v1/unload_lora_adapter": UnloadAdapterRequest,
}
