"""Every answer of a loops server names the server's incarnation: an id drawn when the server
starts. A client that sees it change knows the server restarted and lost its operations and
adapters (``ServerRestartedError``), instead of carrying on against a fresh one."""

from __future__ import annotations

import uuid
from typing import Any

HEADER = b"x-loops-incarnation"


class IncarnationMiddleware:
    def __init__(self, app: Any, incarnation: str | None = None):
        self.app = app
        self.value = (incarnation or uuid.uuid4().hex[:16]).encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, self.value)]}
            await send(message)

        await self.app(scope, receive, stamped)
