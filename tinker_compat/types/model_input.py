"""Mirrors ``tinker.types.model_input`` (the same objects as ``tinker.types``)."""

from . import ModelInput

__all__ = ["ModelInput"]
