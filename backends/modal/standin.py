"""``ModalStandIn``: an in-process stand-in for the small part of Modal the backend uses.

It is not Modal and not an emulator of Modal's API: it implements the backend's provisioning seam
(``platform.Platform``) in this process, so the backend, the container code and the protocol can be
tested without an account::

    with ModalStandIn().active():                  # ModalBackend uses it instead of Modal
        service = ServiceClient(backend="modal")   # no token needed
        tc = service.create_lora_training_client("loops/tiny-qwen3")

* a "container" is the server ``container.build_server`` makes from the same configuration the
  real app receives as a secret, served by uvicorn on 127.0.0.1 (its own thread and event loop);
* the Volume is a directory with Modal's visibility rule: each container works in its own view,
  its writes reach the Volume on ``commit()`` and other views on their ``reload()``; readers from
  outside (list_checkpoints) see only what was committed;
* the session records are a dict; stopping an app stops its container.

``engine="fake"`` (the default) runs every container on the numpy engine whatever was asked;
``engine=None`` keeps what the backend asked for (``local``: torch + HF on this machine's CPU/GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from .container import ContainerSpec, build_server
from .platform import Started, VolumeEntry
from .settings import DEFAULT_VOLUME

_ACTIVE: list["ModalStandIn"] = []


def active_standin() -> "ModalStandIn | None":
    """The innermost active stand-in, if any (the backend asks when it is built)."""
    return _ACTIVE[-1] if _ACTIVE else None


# ---- the Volume -------------------------------------------------------------------------------
def _scan(root: Path) -> dict[str, tuple[int, int]]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _prune(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only empty ones go


class StandInVolume:
    """The committed state of a Volume: a directory."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.commits = 0

    def view(self, directory: Path) -> "VolumeView":
        return VolumeView(self, directory)


class VolumeView:
    """One container's view of the Volume (``commit`` / ``reload`` as on Modal)."""

    def __init__(self, volume: StandInVolume, directory: Path):
        self.volume = volume
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.reloads = 0
        self._synced: dict[str, tuple[int, int]] = {}
        self.reload()
        self.reloads = 0

    def commit(self) -> None:
        """Changes of this view since the last sync reach the Volume (others' files stay)."""
        with self.volume.lock:
            mine = _scan(self.dir)
            for rel, stat in mine.items():
                if self._synced.get(rel) != stat:
                    (self.volume.root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.dir / rel, self.volume.root / rel)
            for rel in set(self._synced) - set(mine):  # deleted here
                with contextlib.suppress(FileNotFoundError):
                    (self.volume.root / rel).unlink()
            _prune(self.volume.root)
            self._synced = _scan(self.dir)
            self.volume.commits += 1

    def reload(self) -> None:
        """The Volume's committed state replaces this view (uncommitted new files are kept)."""
        with self.volume.lock:
            theirs = _scan(self.volume.root)
            mine = _scan(self.dir)
            for rel, stat in theirs.items():
                if mine.get(rel) != stat:  # copy2 keeps mtimes, so equal stats mean equal files
                    (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.volume.root / rel, self.dir / rel)
            for rel in set(self._synced) - set(theirs):  # deleted on the Volume
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / rel).unlink()
            _prune(self.dir)
            self._synced = _scan(self.dir)
            self.reloads += 1


# ---- a container ------------------------------------------------------------------------------
class LoopbackServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread of its own."""

    def __init__(self, app: Any):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=120,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"modal-standin-{self.url}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the stand-in server at {self.url} did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class StandInContainer:
    def __init__(self, spec: ContainerSpec, view: VolumeView):
        self.spec = spec
        self.view = view
        self.server = build_server(spec.config, volume=view, local=view.dir)
        self.http = LoopbackServer(self.server.app)
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.http.stop()
        if hasattr(self.server, "close"):
            self.server.close()
        else:
            self.server.shutting_down = True


# ---- the platform -----------------------------------------------------------------------------
class ModalStandIn:
    """In-process stand-in for Modal (see the module docstring)."""

    def __init__(self, *, engine: str | None = "fake", root: Path | str | None = None, volume: str = DEFAULT_VOLUME):
        self.engine = engine
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="loops-modal-standin-"))
        self.volume_name = volume
        self.volume = StandInVolume(self.root / "volumes" / volume)
        self.specs: list[ContainerSpec] = []                # every container asked for, in order
        self.apps: dict[str, StandInContainer] = {}         # app id -> running container
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()

    # ---- activation ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator["ModalStandIn"]:
        """ModalBackends built inside this block use the stand-in; on exit its containers stop."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)
            self.close()

    def close(self) -> None:
        for app_id in list(self.apps):
            self._stop_now(app_id)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> list[StandInContainer]:
        return [c for c in self.apps.values() if not c.stopped]

    # ---- Platform -------------------------------------------------------------------------------
    async def start(self, spec: ContainerSpec) -> Started:
        if self.engine is not None:
            spec = replace(spec, config=replace(spec.config, engine=self.engine))
        app_id = f"ap-standin-{uuid.uuid4().hex[:10]}"
        view = self.volume.view(self.root / "containers" / app_id)
        container = await asyncio.to_thread(StandInContainer, spec, view)
        with self._lock:
            self.specs.append(spec)
            self.apps[app_id] = container

        async def stop() -> None:
            if not spec.detach:  # exiting app.run() stops an ephemeral app, not a detached one
                await asyncio.to_thread(self._stop_now, app_id)

        return Started(role=spec.role, url=container.http.url, app_id=app_id, app_name=spec.app_name, stop=stop)

    def _stop_now(self, app_id: str) -> None:
        container = self.apps.get(app_id)
        if container is not None:
            container.stop()

    async def stop_app(self, app_id: str) -> None:
        await asyncio.to_thread(self._stop_now, app_id)

    async def listdir(self, path: str) -> list[VolumeEntry]:
        base = self.volume.root / path
        if not base.exists():
            return []
        with self.volume.lock:
            return [VolumeEntry(path=str(p.relative_to(self.volume.root)), is_dir=p.is_dir(),
                                size=p.stat().st_size if p.is_file() else 0, mtime=p.stat().st_mtime)
                    for p in sorted(base.rglob("*"))]

    async def read_file(self, path: str) -> bytes | None:
        p = self.volume.root / path
        with self.volume.lock:
            return p.read_bytes() if p.is_file() else None

    def file_url(self, path: str) -> str:
        # The stand-in's Volume is a local directory, so its files have real file:// URLs.
        return (self.volume.root / path).resolve().as_uri()

    async def get_record(self, key: str) -> dict | None:
        return self.records.get(key)

    async def put_record(self, key: str, value: dict) -> None:
        self.records[key] = value


def standin_from_env() -> ModalStandIn:
    """The stand-in the contract suite uses (``LOOPS_MODAL_STANDIN_ENGINE``: ``fake`` or ``local``)."""
    engine = os.environ.get("LOOPS_MODAL_STANDIN_ENGINE", "fake")
    return ModalStandIn(engine=None if engine in ("", "asked") else engine)
