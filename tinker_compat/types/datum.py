"""Mirrors ``tinker.types.datum`` (the same objects as ``tinker.types``)."""

from . import Datum

__all__ = ["Datum"]
