"""Mirrors ``tinker.types.sampling_params`` (the same objects as ``tinker.types``)."""

from . import SamplingParams

__all__ = ["SamplingParams"]
