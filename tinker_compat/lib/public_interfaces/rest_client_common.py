"""Mirrors ``tinker.lib.public_interfaces.rest_client_common`` (helpers of Tinker's REST client; none public)."""
