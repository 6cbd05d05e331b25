"""Mirrors ``tinker.proto`` (Tinker's wire protocol buffers): loops speaks its own protocol, so it is empty."""
