"""The provisioning seam: the few things the Modal backend asks of Modal.

``ModalPlatform`` does them with the modal client; ``standin.ModalStandIn`` does them in this
process (containers are our server apps on loopback, the Volume is a directory). ``ModalBackend``
talks only to this interface:

* ``start(spec)``: run one container's app (ephemeral, or detached) and return its web URL and
  how to stop it;
* ``stop_app(app_id)``: stop an app another session started (reuse);
* ``listdir(path)`` / ``read_file(path)`` / ``file_url(path)``: read the checkpoint Volume from
  outside any container;
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
    async def listdir(self, path: str) -> list[VolumeEntry]: ...
    async def read_file(self, path: str) -> bytes | None: ...
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
    """Modal, through its Python client (needs a token: ``modal token new``)."""

    def __init__(self, settings: ModalSettings):
        require_credentials()
        self.settings = settings
        self.modal = import_modal()

    async def start(self, spec: ContainerSpec) -> Started:
        from .app import build_app

        built = build_app(spec)
        stack = contextlib.AsyncExitStack()
        if spec.output:
            stack.enter_context(self.modal.enable_output())
        try:
            # Ephemeral: Modal stops the app when the context exits (aclose), or soon after this
            # process stops heart-beating (a crash). Detached: it outlives us until stopped.
            await stack.enter_async_context(built.app.run(detach=spec.detach))
            url = await built.cls().web.get_web_url.aio()
        except BaseException:
            await stack.aclose()
            raise
        log.info("modal %s app %s: %s", spec.role, spec.app_name, url)
        return Started(role=spec.role, url=url, app_id=built.app.app_id, app_name=spec.app_name, stop=stack.aclose)

    async def stop_app(self, app_id: str) -> None:
        app = await self.modal.App.lookup.aio(app_id)
        await app.stop.aio()

    def _volume(self) -> Any:
        return self.modal.Volume.from_name(self.settings.volume, create_if_missing=True)

    async def listdir(self, path: str) -> list[VolumeEntry]:
        from modal.exception import NotFoundError

        try:
            entries = await self._volume().listdir.aio(path, recursive=True)
        except NotFoundError:
            return []
        return [VolumeEntry(path=e.path.lstrip("/"), is_dir=e.type.name == "DIRECTORY", size=int(e.size or 0),
                            mtime=float(e.mtime or 0)) for e in entries]

    async def read_file(self, path: str) -> bytes | None:
        from modal.exception import NotFoundError

        try:
            return b"".join([chunk async for chunk in self._volume().read_file.aio(path)])
        except NotFoundError:
            return None

    def file_url(self, path: str) -> str:
        # Volume files have no public URL; this names the file for `modal volume get`.
        return f"modal-volume://{self.settings.volume}/{path}"

    def _sessions(self) -> Any:
        return self.modal.Dict.from_name(SESSIONS_DICT, create_if_missing=True)

    async def get_record(self, key: str) -> dict | None:
        return await self._sessions().get.aio(key)

    async def put_record(self, key: str, value: dict) -> None:
        await self._sessions().put.aio(key, value)
