"""The container side of the fake Modal control plane (``fake_control_plane``): a STAND-IN.

Real Modal runs a web endpoint's class in a container it starts on the first request and stops
after ``scaledown_window`` idle seconds; a request that runs past 150 s is answered with a 303 to
the same URL plus ``__modal_function_call_id``; a Volume mounted in a container shows other
containers' writes only after their ``commit()`` and its own ``reload()``. Here:

* ``WebEndpoint`` is one web function's public URL: a uvicorn server on 127.0.0.1 whose ASGI app
  starts the "container" on the first request (``cold start``), forwards every request to it,
  answers 303 past ``deadline_s``, stops it after ``idle_s`` (scale-down) or on ``restart()``,
  and answers 404 once its app is stopped;
* a container is what ``app.serve_container`` builds from the function's secrets and mounts: the
  same hook the class's ``@modal.enter()`` calls in a real container, in this process;
* ``FakeVolume`` / ``VolumeView`` keep Modal's commit / reload visibility rule, and a view's
  ``reload`` can be scripted to fail as Modal's does while files are open.

What cannot be reached this way: the container runtime itself (image builds, GPUs, process
isolation, Modal's own answer when a container dies at start); see the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

log = logging.getLogger("loops.modal.fake")
OPEN_FILES = "there are open files preventing the operation"  # Modal's reload conflict, verbatim
# Containers here share one process: two cold starts importing transformers at once in two threads
# can fail (its lazy imports are not thread-safe), which separate containers never see.
_START_LOCK = threading.Lock()


# ---- the Volume -------------------------------------------------------------------------------
def _scan(root: Path) -> dict[str, tuple[int, int]]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _prune(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty ones go


class FakeVolume:
    """A Volume's committed state: a directory."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.commits = 0
        self.reload_conflicts = 0  # the next N reloads (any view) fail with Modal's open-files error

    def view(self, directory: Path) -> "VolumeView":
        return VolumeView(self, directory)


class VolumeView:
    """One container's mount of a Volume, with ``commit`` / ``reload`` as on Modal."""

    def __init__(self, volume: FakeVolume, directory: Path):
        self.volume = volume
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._synced: dict[str, tuple[int, int]] = {}
        self.reloads = 0
        self._sync_from_volume()

    def commit(self) -> None:
        """This view's changes since its last sync reach the Volume (others' files stay)."""
        with self.volume.lock:
            mine = _scan(self.dir)
            for rel, stat in mine.items():
                if self._synced.get(rel) != stat:
                    (self.volume.root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.dir / rel, self.volume.root / rel)
            for rel in set(self._synced) - set(mine):
                with contextlib.suppress(FileNotFoundError):
                    (self.volume.root / rel).unlink()
            _prune(self.volume.root)
            self._synced = _scan(self.dir)
            self.volume.commits += 1

    def reload(self) -> None:
        with self.volume.lock:
            if self.volume.reload_conflicts > 0:
                self.volume.reload_conflicts -= 1
                raise RuntimeError(f"Volume reload failed: {OPEN_FILES}")  # what modal.Volume.reload raises
        self._sync_from_volume()
        self.reloads += 1

    def _sync_from_volume(self) -> None:
        with self.volume.lock:
            theirs, mine = _scan(self.volume.root), _scan(self.dir)
            for rel, stat in theirs.items():
                if mine.get(rel) != stat:  # copy2 keeps mtimes: equal stats, equal files
                    (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.volume.root / rel, self.dir / rel)
            for rel in set(self._synced) - set(theirs):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / rel).unlink()
            _prune(self.dir)
            self._synced = _scan(self.dir)


# ---- loopback HTTP ----------------------------------------------------------------------------
class LoopbackServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread of its own."""

    def __init__(self, app: Any, name: str = "fake-modal"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", interface="asgi3",
                                                    timeout_keep_alive=120,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"{name}-{self.url}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the loopback server at {self.url} did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ---- a web endpoint and its container ---------------------------------------------------------
@dataclass
class Script:
    """Server-side events a test asks for, per endpoint."""

    crash_at_start: int = 0        # the next N container starts die (the process, not a Python error)
    enter_error: str | None = None  # the next container's @enter raises this (a Python error)
    deadline_s: float = 150.0      # Modal's web request limit: past it, a 303 to the call's result
    start_delay_s: float = 0.0     # a slow cold start (image pull, model load)
    delay_s: dict[str, float] = field(default_factory=dict)  # path -> extra seconds a request takes
    starts: int = 0                # containers started so far (restarts included)
    crashes: int = 0
    redirects: int = 0             # 303s answered
    followed: int = 0              # GETs of a 303's location (a client that follows it)


@dataclass
class Container:
    server: Any
    views: list[VolumeView]
    started: float = field(default_factory=time.monotonic)


class WebEndpoint:
    """One web function's URL (see the module docstring)."""

    def __init__(self, *, app_id: str, label: str, start: Callable[[Script], Container], idle_s: float,
                 script: Script | None = None):
        self.app_id = app_id
        self.label = label
        self._start = start
        self.idle_s = idle_s
        self.script = script or Script()
        self.container: Container | None = None
        self.stopped = False
        self.last_request = time.monotonic()
        self._calls: dict[str, asyncio.Task] = {}
        self._lock: asyncio.Lock | None = None
        self.http = LoopbackServer(self._asgi, name=f"fake-modal-{label}")
        self.url = self.http.url
        self._reaper = threading.Thread(target=self._reap, daemon=True, name=f"fake-modal-reaper-{label}")
        self._reaper.start()

    # ---- scripted events ----------------------------------------------------------------------
    def restart(self) -> None:
        """The container goes away (preemption, a crash after start); the next request starts anew."""
        container, self.container = self.container, None
        if container is not None:
            _close(container.server)

    def stop(self) -> None:
        self.stopped = True
        self.restart()
        self.http.stop()

    def _reap(self) -> None:
        while not self.stopped:
            time.sleep(min(0.5, self.idle_s / 4))
            if self.container is not None and time.monotonic() - self.last_request > self.idle_s:
                log.info("fake modal: %s idle for %.1f s: scaling down", self.label, self.idle_s)
                self.restart()

    # ---- the proxy ------------------------------------------------------------------------------
    async def _asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        from starlette.requests import Request
        from starlette.responses import Response

        request = Request(scope, receive)
        self.last_request = time.monotonic()
        if self.stopped:
            await Response("modal-http: app for invoked web endpoint is stopped", 404)(scope, receive, send)
            return
        call_id = request.query_params.get("__modal_function_call_id")
        if call_id is not None:
            self.script.followed += 1
            task = self._calls.get(call_id)
            if task is None:
                await Response(f"modal-http: unknown function call {call_id}", 404)(scope, receive, send)
                return
        else:
            body = await request.body()
            task = asyncio.ensure_future(self._forward(request.method, scope, body))
            call_id = f"fc-{uuid.uuid4().hex[:12]}"
            self._calls[call_id] = task
        done, _ = await asyncio.wait({task}, timeout=self.script.deadline_s)
        if not done:  # Modal: a 303 to the same URL naming the call; the client follows it with a GET
            path = scope["path"]
            self.script.redirects += 1
            await Response(status_code=303, headers={"location": f"{path}?__modal_function_call_id={call_id}"})(
                scope, receive, send)
            return
        self._calls.pop(call_id, None)
        status, headers, content = task.result()
        await Response(content, status, headers=headers)(scope, receive, send)
        self.last_request = time.monotonic()

    def _start_one(self) -> Container:
        with _START_LOCK:
            return self._start(self.script)

    async def _forward(self, method: str, scope: dict, body: bytes) -> tuple[int, dict, bytes]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one cold start at a time
            if self.container is None:
                try:
                    await asyncio.sleep(self.script.start_delay_s)
                    self.container = await asyncio.to_thread(self._start_one)
                except Exception as exc:
                    self.script.crashes += 1
                    log.warning("fake modal: %s container failed at start: %s", self.label, exc)
                    return 500, {}, b"modal-http: internal error: the container exited before it could serve"
            container = self.container
        await asyncio.sleep(self.script.delay_s.get(scope["path"], 0.0))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in (b"host", b"content-length")]
        query = scope.get("query_string", b"").decode()
        transport = httpx.ASGITransport(app=container.server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://container", timeout=None) as client:
            r = await client.request(method, scope["path"] + (f"?{query}" if query else ""), headers=headers,
                                     content=body)
        out = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        return r.status_code, out, r.content


def _close(server: Any) -> None:
    close = getattr(server, "close", None)
    if callable(close):
        close()
    else:
        server.shutting_down = True
