"""Mirrors ``tinker.types.training_run`` (the same objects as ``tinker.types``)."""

from . import TrainingRun

__all__ = ["TrainingRun"]
