"""Mirrors ``tinker.resources`` (Tinker's HTTP resource classes): loops speaks its own protocol, so it is empty."""
