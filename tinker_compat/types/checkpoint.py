"""Mirrors ``tinker.types.checkpoint`` (the same objects as ``tinker.types``)."""

from . import Checkpoint, CheckpointType, ParsedCheckpointTinkerPath

__all__ = ["Checkpoint", "CheckpointType", "ParsedCheckpointTinkerPath"]
