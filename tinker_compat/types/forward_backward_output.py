"""Mirrors ``tinker.types.forward_backward_output`` (the same objects as ``tinker.types``)."""

from . import ForwardBackwardOutput

__all__ = ["ForwardBackwardOutput"]
