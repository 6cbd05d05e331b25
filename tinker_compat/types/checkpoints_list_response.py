"""Mirrors ``tinker.types.checkpoints_list_response`` (the same objects as ``tinker.types``)."""

from . import CheckpointsListResponse

__all__ = ["CheckpointsListResponse"]
