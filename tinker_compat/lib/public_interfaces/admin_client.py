"""Tinker's ``AdminClient`` (audit log, billing, storage usage): loops has no accounts, so each call raises."""

from __future__ import annotations

from typing import Any

from .api_future import APIFuture, AwaitableConcurrentFuture, unsupported  # noqa: F401 (Tinker's import path)


class AdminClient:
    """Tinker's organisation admin API; every method raises ``NotImplementedError`` naming the reason."""

    def __init__(self, _holder: Any = None, *, base_url: str | None = None, api_key: str | None = None):
        self._holder = _holder

    def get_audit_log(self, event_type: str = "all", day: Any = None) -> Any:
        raise unsupported("AdminClient.get_audit_log", "loops keeps no audit log (admin)")

    def get_audit_log_async(self, event_type: str = "all", day: Any = None) -> Any:
        raise unsupported("AdminClient.get_audit_log_async", "loops keeps no audit log (admin)")

    def get_billing_usage(self, starting_on: Any, ending_before: Any) -> Any:
        raise unsupported("AdminClient.get_billing_usage", "loops does no billing")

    def get_billing_usage_async(self, starting_on: Any, ending_before: Any) -> Any:
        raise unsupported("AdminClient.get_billing_usage_async", "loops does no billing")

    def get_current_checkpoint_storage_usage(self, project_id: str | None = None) -> Any:
        raise unsupported("AdminClient.get_current_checkpoint_storage_usage", "loops does no storage accounting")

    def get_current_checkpoint_storage_usage_async(self, project_id: str | None = None) -> Any:
        raise unsupported("AdminClient.get_current_checkpoint_storage_usage_async", "loops does no storage accounting")

    def get_telemetry(self) -> None:
        """loops sends no telemetry."""
        return None
