"""Mirrors ``tinker.types.optimizer`` (the same objects as ``tinker.types``)."""

from . import (AdamOptimizerConfig, AdamParams, DimuonOptimizerConfig, DimuonParams, OptimizerConfig,
               OptimParams)

__all__ = ["AdamOptimizerConfig", "AdamParams", "DimuonOptimizerConfig", "DimuonParams", "OptimParams",
           "OptimizerConfig"]
