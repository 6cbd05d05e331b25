"""Mirrors ``tinker.types.encoded_text_chunk`` (the same objects as ``tinker.types``)."""

from . import EncodedTextChunk

__all__ = ["EncodedTextChunk"]
