"""Mirrors ``tinker.types.image_chunk`` (the same objects as ``tinker.types``)."""

from . import ImageChunk

__all__ = ["ImageChunk"]
