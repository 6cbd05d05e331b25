"""Mirrors ``tinker.types.lora_config`` (the same objects as ``tinker.types``)."""

from . import LoraConfig

__all__ = ["LoraConfig"]
