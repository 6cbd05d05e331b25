"""What users configure: Adam, sampling, LoRA and W&B settings."""

from __future__ import annotations

from pydantic import Field, field_validator

from ._base import Request


class AdamParams(Request):
    """Adam(W) hyperparameters. ``grad_clip_norm=0`` disables clipping; weight decay is decoupled."""

    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=1.0, ge=0)


class SamplingParams(Request):
    """Generation controls. ``stop`` is a string, a list of strings or a list of token ids."""

    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("SamplingParams.top_k must be -1 (disabled) or a positive integer")
        return v


class WandbConfig(Request):
    project: str
    name: str | None = None


class LoraConfig(Request):
    rank: int = Field(default=32, gt=0)
    seed: int | None = None
    train_unembed: bool = False
    train_mlp: bool = True
    train_attn: bool = True
