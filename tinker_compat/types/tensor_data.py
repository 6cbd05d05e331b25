"""Mirrors ``tinker.types.tensor_data`` (the same objects as ``tinker.types``)."""

from . import TensorData

__all__ = ["TensorData"]
