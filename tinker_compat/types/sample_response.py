"""Mirrors ``tinker.types.sample_response`` (the same objects as ``tinker.types``)."""

from . import SampleResponse

__all__ = ["SampleResponse"]
