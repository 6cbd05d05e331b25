"""Mirrors ``tinker.types.loss_fn_type`` (the same objects as ``tinker.types``)."""

from . import LossFnType

__all__ = ["LossFnType"]
