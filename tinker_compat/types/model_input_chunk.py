"""Mirrors ``tinker.types.model_input_chunk`` (the same objects as ``tinker.types``)."""

from . import ModelInputChunk

__all__ = ["ModelInputChunk"]
