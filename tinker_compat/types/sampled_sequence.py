"""Mirrors ``tinker.types.sampled_sequence`` (the same objects as ``tinker.types``)."""

from . import SampledSequence

__all__ = ["SampledSequence"]
