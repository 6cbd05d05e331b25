"""Mirrors ``tinker.auth`` (Tinker's credential helpers). loops backends take their own credentials
(``LOOPS_BACKEND`` and each backend's settings), so only the error type is here."""

from ._exceptions import TinkerError

__all__ = ["TinkerError"]
