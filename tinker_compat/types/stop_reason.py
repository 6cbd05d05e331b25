"""Mirrors ``tinker.types.stop_reason`` (the same objects as ``tinker.types``)."""

from . import StopReason

__all__ = ["StopReason"]
