"""Running server apps on real sockets: ``loops serve`` and the local backend's subprocesses.

Sockets are bound before the servers start, so port 0 gets a free port that is known at once.
When all servers listen, one JSON line ``{"ready": true, "urls": {...}}`` is printed: the local
backend's parent process reads it. A child started with ``parent_pid`` exits when that process
dies (a watchdog thread polls it; PR_SET_PDEATHSIG is not used because it fires when the *thread*
that forked exits, not the process), so a crashed user script leaves no orphaned servers behind.

SIGTERM/SIGINT start a graceful shutdown: new submits get 503, queued operations fail with
``ServerShutdownError``, the running ones finish (at most ``LOOPS_SHUTDOWN_TIMEOUT_S``, default 120 s),
polls are answered for ``LOOPS_DRAIN_S`` more seconds (default 10), then the process exits 0. A second
SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
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
    flag: str = "--port"  # the option that sets ``port``, for the "already in use" message

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this: without it small responses wait out the peer's delayed
        # ACK (~40 ms a request on loopback), since we hand uvicorn pre-bound sockets.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(f"loops: port {self.port} on {self.host} is already in use ({self.name}); "
                                 f"pick another with {self.flag}") from None
            raise SystemExit(f"loops: cannot listen on {self.host}:{self.port} ({self.name}): {exc}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


MIN_KEY_CHARS = 16


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    if host in LOOPBACK:
        return
    if not api_key:
        raise SystemExit(f"refusing to listen on {host} without an API key: set LOOPS_API_KEY or pass "
                         "--api-key-file PATH (servers bind 127.0.0.1 unless told otherwise)")
    if len(api_key) < MIN_KEY_CHARS:
        raise SystemExit(f"refusing to listen on {host} with an API key of {len(api_key)} characters: use at least "
                         f"{MIN_KEY_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def serve(listeners: list[Listener], *, parent_pid: int | None = None, on_ready: Any = None,
          log_level: str | None = None) -> None:
    """Serve every listener on one event loop until SIGINT/SIGTERM (or the parent's death)."""
    import uvicorn

    level = (log_level or os.environ.get("LOOPS_LOG_LEVEL") or "warning").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loops").setLevel(level)
    if parent_pid:
        watch_parent(parent_pid)
    sockets = [lst.bind() for lst in listeners]
    stop = {"asked": 0}

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # called for SIGINT/SIGTERM
            stop["asked"] += 1
            if stop["asked"] > 1 and sig == signal.SIGINT:
                for srv in servers:
                    srv.should_exit = srv.force_exit = True
            elif stop["asked"] == 1:
                stop["event"].set()

    servers = [DrainingServer(uvicorn.Config(lst.app, log_level=level.lower(), access_log=False,
                                             timeout_keep_alive=120, lifespan="off"))
               for lst in listeners]

    async def drain_then_exit() -> None:
        await stop["event"].wait()
        from .http import find_guard

        guards = [g for g in (find_guard(lst.app) for lst in listeners) if g is not None]
        logging.getLogger("loops.server").warning("shutting down: new submits get 503; finishing running work")
        for g in guards:
            g.begin_shutdown()
        await asyncio.gather(*(g.drain(g.limits.shutdown_timeout_s) for g in guards))
        for srv in servers:
            srv.should_exit = True

    async def main() -> None:
        stop["event"] = asyncio.Event()
        drainer = asyncio.create_task(drain_then_exit())
        tasks = [asyncio.create_task(srv.serve(sockets=[sock])) for srv, sock in zip(servers, sockets)]
        while not all(srv.started for srv in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"ready": True, "urls": {lst.name: lst.url for lst in listeners}}), flush=True)
        if on_ready:
            on_ready(listeners)
        await asyncio.gather(*tasks)
        drainer.cancel()

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
