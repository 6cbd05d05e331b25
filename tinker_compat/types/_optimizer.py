"""Optimizer settings, as in Tinker. loops trainers run AdamW only: Dimuon types exist and are refused
by ``optim_step`` / ``create_lora_training_client`` with a ``BadRequestError``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializeAsAny

from ._base import StrictBase

__all__ = ["AdamOptimizerConfig", "AdamParams", "DimuonOptimizerConfig", "DimuonParams", "OptimParams",
           "OptimizerConfig"]


class OptimizerConfigBase(StrictBase, frozen=True, extra="allow"):
    type: str


class AdamOptimizerConfig(OptimizerConfigBase, frozen=True, extra="forbid"):
    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(OptimizerConfigBase, frozen=True, extra="forbid"):
    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig = AdamOptimizerConfig | SerializeAsAny[OptimizerConfigBase]


class AdamParams(StrictBase):
    """AdamW hyperparameters with Tinker's defaults (``grad_clip_norm=0.0``: no clipping)."""

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimParamsBase(StrictBase, frozen=True, extra="allow"):
    type: str


class DimuonParams(OptimParamsBase, frozen=True, extra="forbid", allow_inf_nan=False):
    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = 0.0
    beta1: float = Field(default=0.9, ge=0, lt=1)


OptimParams = AdamParams | SerializeAsAny[OptimParamsBase]
