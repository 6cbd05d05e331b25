"""The provisioning seam: the few things the Modal backend asks of Modal.

``ModalPlatform`` does them with the modal client (in tests, against the fake control plane in
``fake_control_plane``). ``ModalBackend`` talks only to this interface:

* ``start(spec)``: run one container's app (ephemeral, or detached) and return its web URL and
  how to stop it;
* ``stop_app(app_id)``: stop an app by id (reuse; a failed detached start);
* ``stop_pending()``: stop the apps whose start has not returned (close or exit mid-provisioning);
* ``listdir(path)`` / ``read_file(path)`` / ``remove(path)`` / ``file_url(path)``: the checkpoint
  Volume from outside any container;
* ``get_record(key)`` / ``put_record(key, value)``: the session records that make
  ``reuse_from_session_id`` work across processes (a ``modal.Dict``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from loops_core.errors import BackendUnavailableError

from .container import ContainerSpec
from .settings import SESSIONS_DICT, ModalSettings, require_credentials

log = logging.getLogger("loops.modal")


@dataclass
class Started:
    """A running container app."""

    role: str
    url: str
    app_id: str | None
    app_name: str
    stop: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class VolumeEntry:
    path: str          # relative to the Volume's root, no leading slash
    is_dir: bool
    size: int
    mtime: float


class Platform(Protocol):
    async def start(self, spec: ContainerSpec) -> Started: ...
    async def stop_app(self, app_id: str) -> None: ...
    async def stop_pending(self) -> None: ...
    async def listdir(self, path: str) -> list[VolumeEntry]: ...
    async def read_file(self, path: str) -> bytes | None: ...
    async def remove(self, path: str) -> None: ...
    def file_url(self, path: str) -> str: ...
    async def get_record(self, key: str) -> dict | None: ...
    async def put_record(self, key: str, value: dict) -> None: ...


def import_modal() -> Any:
    try:
        import modal
    except ImportError as exc:
        raise BackendUnavailableError("modal", "modal", exc) from exc
    return modal


class ModalPlatform:
    """Modal, through its Python client (needs credentials: ``modal token new``)."""

    def __init__(self, settings: ModalSettings):
        self.modal = import_modal()
        require_credentials()
        self.settings = settings
        self.pending: dict[str, Any] = {}   # app name -> modal.App whose start has not returned yet

    async def start(self, spec: ContainerSpec) -> Started:
        from .app import build_app

        built = build_app(spec)
        stack = contextlib.AsyncExitStack()
        if spec.output:
            stack.enter_context(self.modal.enable_output())
        self.pending[spec.app_name] = built.app
        try:
            # Ephemeral: Modal stops the app when the context exits (aclose), or soon after this
            # process stops heart-beating (a crash). Detached: it outlives us until stopped.
            await stack.enter_async_context(built.app.run(detach=spec.detach))
            url = await built.cls().web.get_web_url.aio()
        except BaseException:
            # Interrupted (Ctrl-C cancels this task) or failed: nothing of it may keep running.
            # Leaving app.run() disconnects, which ends an ephemeral app but not a detached one.
            await stack.aclose()
            if built.app.app_id:
                with contextlib.suppress(Exception):
                    await self.stop_app(built.app.app_id)
            raise
        finally:
            self.pending.pop(spec.app_name, None)
        log.info("modal %s app %s (%s): %s", spec.role, spec.app_name, built.app.app_id, url)
        return Started(role=spec.role, url=url, app_id=built.app.app_id, app_name=spec.app_name, stop=stack.aclose)

    async def stop_pending(self) -> None:
        """Stop the apps still being started (close() or exit while provisioning)."""
        for name, app in list(self.pending.items()):
            if app.app_id:
                try:
                    await self.stop_app(app.app_id)
                except Exception as exc:
                    log.warning("could not stop Modal app %s (%s): %s", app.app_id, name, exc)

    async def stop_app(self, app_id: str) -> None:
        app = await self.modal.App.lookup.aio(app_id)
        await app.stop.aio()

    def _volume(self) -> Any:
        return self.modal.Volume.from_name(self.settings.volume, create_if_missing=True)

    async def listdir(self, path: str) -> list[VolumeEntry]:
        from modal.exception import NotFoundError

        try:
            entries = await self._volume().listdir.aio(path, recursive=True)
        except (NotFoundError, FileNotFoundError):
            return []
        return [VolumeEntry(path=e.path.lstrip("/"), is_dir=e.type.name == "DIRECTORY", size=int(e.size or 0),
                            mtime=float(e.mtime or 0)) for e in entries]

    async def read_file(self, path: str) -> bytes | None:
        from modal.exception import NotFoundError

        try:
            return b"".join([chunk async for chunk in self._volume().read_file.aio(path)])
        except (NotFoundError, FileNotFoundError):  # Volume.read_file turns Modal's NotFoundError into the builtin
            return None

    async def remove(self, path: str) -> None:
        """Remove a file or directory tree from the Volume (containers see it after their next reload)."""
        await self._volume().remove_file.aio(path, recursive=True)

    def file_url(self, path: str) -> str:
        # Volume files have no public URL; this names the file for `modal volume get`.
        return f"modal-volume://{self.settings.volume}/{path}"

    def _sessions(self) -> Any:
        return self.modal.Dict.from_name(SESSIONS_DICT, create_if_missing=True)

    async def get_record(self, key: str) -> dict | None:
        return await self._sessions().get.aio(key)

    async def put_record(self, key: str, value: dict) -> None:
        await self._sessions().put.aio(key, value)
