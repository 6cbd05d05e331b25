"""Mirrors ``tinker.types.weights_info_response`` (the same objects as ``tinker.types``)."""

from . import WeightsInfoResponse

__all__ = ["WeightsInfoResponse"]
