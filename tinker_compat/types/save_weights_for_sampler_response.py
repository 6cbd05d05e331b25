"""Mirrors ``tinker.types.save_weights_for_sampler_response`` (the same objects as ``tinker.types``)."""

from . import SaveWeightsForSamplerResponse

__all__ = ["SaveWeightsForSamplerResponse"]
