"""Mirrors ``tinker.types.save_weights_response`` (the same objects as ``tinker.types``)."""

from . import SaveWeightsResponse

__all__ = ["SaveWeightsResponse"]
