"""Running server apps on real sockets: ``loops serve`` and the local backend's subprocesses.

Sockets are bound before the servers start, so port 0 gets a free port that is known at once.
When all servers listen, one JSON line ``{"ready": true, "urls": {...}}`` is printed: the local
backend's parent process reads it. A child started with ``parent_pid`` exits when that process
dies (a watchdog thread polls it; PR_SET_PDEATHSIG is not used because it fires when the *thread*
that forked exits, not the process), so a crashed user script leaves no orphaned servers behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Listener:
    name: str
    app: Any
    host: str
    port: int = 0

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this: without it small responses wait out the peer's delayed
        # ACK (~40 ms a request on loopback), since we hand uvicorn pre-bound sockets.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise SystemExit(f"refusing to listen on {host} without an API key: pass --api-key or set LOOPS_API_KEY "
                         "(servers bind 127.0.0.1 unless told otherwise)")


def serve(listeners: list[Listener], *, parent_pid: int | None = None, on_ready: Any = None) -> None:
    """Serve every listener on one event loop until SIGINT/SIGTERM (or the parent's death)."""
    import uvicorn

    if parent_pid:
        watch_parent(parent_pid)
    sockets = [lst.bind() for lst in listeners]
    servers = [uvicorn.Server(uvicorn.Config(lst.app, log_level=os.environ.get("LOOPS_LOG_LEVEL", "warning"),
                                             timeout_keep_alive=120, lifespan="off"))
               for lst in listeners]

    async def main() -> None:
        tasks = [asyncio.create_task(srv.serve(sockets=[sock])) for srv, sock in zip(servers, sockets)]
        while not all(srv.started for srv in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"ready": True, "urls": {lst.name: lst.url for lst in listeners}}), flush=True)
        if on_ready:
            on_ready(listeners)
        await asyncio.gather(*tasks)

    asyncio.run(main())


def watch_parent(pid: int) -> None:
    """Exit this process when ``pid`` dies."""
    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
                if os.getppid() != pid:
                    raise ProcessLookupError
            except (ProcessLookupError, PermissionError):
                os._exit(0)

    threading.Thread(target=watchdog, name="loops-parent-watch", daemon=True).start()
