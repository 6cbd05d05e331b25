"""Mirrors ``tinker.types.optim_step_response`` (the same objects as ``tinker.types``)."""

from . import OptimStepResponse

__all__ = ["OptimStepResponse"]
