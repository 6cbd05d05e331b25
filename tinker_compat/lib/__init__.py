"""Mirrors ``tinker.lib``: the public interfaces live in ``tinker.lib.public_interfaces``."""
