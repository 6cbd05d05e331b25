"""Mirrors ``tinker.types.get_info_response`` (the same objects as ``tinker.types``)."""

from . import GetInfoResponse, ModelData

__all__ = ["GetInfoResponse", "ModelData"]
