"""The checkpoint Volume inside a container: the store, its syncing off the event loop, and the
journal that lets a restarted sampler serve the versions it served before.

A Modal Volume is not a shared disk: a writer's files reach other containers only after the
writer calls ``volume.commit()`` and the reader calls ``volume.reload()``. The servers read and
write checkpoints only through their ``CheckpointStore``, so ``VolumeCheckpointStore`` is the one
place that knows: ``create`` (save_state, save_weights_for_sampler; run on the trainer's worker
thread) commits before it returns, which is before the trainer tells the sampler to load the
adapter; reads reload first.

Both calls block (a round trip to Modal, a remount), and the servers resolve checkpoints inside
``async def`` routes. So ``VolumeSyncMiddleware`` reloads in a worker thread before a request that
reads checkpoints reaches the server, and the store then skips its own reload; a read on the event
loop that no middleware prepared uses the current view rather than block. ``reload`` fails while
files are open in the container (Modal: "there are open files preventing the operation"); it is
retried, and when it keeps failing the request fails instead of reading a stale view.

``PublishedJournal``: the sampler keeps the versions the trainer published in memory only. It
records each successful ``/v1/load_lora_adapter`` on the Volume, and a new sampler container (after
a scale-down or a preemption) loads them back, through its own route, before it answers anything,
so clients pinned to a version keep working. The journal also keeps the sampler's incarnation id
(the ``x-loops-incarnation`` every answer carries): a container that restored every version takes
it over, since nothing a client relies on was lost; one that could not restore them keeps its new
id, so clients see the restart (``ServerRestartedError``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Protocol

import httpx
import tenacity

from loops_core.checkpoints import CheckpointStore
from loops_core.types import Checkpoint

from .settings import VOLUME_MOUNT

log = logging.getLogger("loops.modal")
RELOAD_ATTEMPTS = 8          # 0.1 + 0.2 + ... + 6.4 s: long enough for a save in flight to close its files
_synced: contextvars.ContextVar[bool] = contextvars.ContextVar("loops_volume_synced", default=False)


class Volume(Protocol):
    def commit(self) -> None: ...
    def reload(self) -> None: ...


class VolumeReloadError(RuntimeError):
    pass


def volume_reload_retrying(sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """The retry policy of ``volume.reload()`` (blocking: a worker thread or start-up). Modal
    refuses a reload while files are open in the container, for as long as a save in flight keeps
    them open; the modal client's errors carry no status, so every error is retried:
    ``RELOAD_ATTEMPTS`` attempts, 0.1 s doubling between them, then ``tenacity.RetryError``."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Exception),
        stop=tenacity.stop_after_attempt(RELOAD_ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=0.1, max=10.0),
        before_sleep=lambda state: log.info("volume reload refused (%s); retrying", state.outcome.exception()),
        sleep=sleep)


class VolumeCheckpointStore(CheckpointStore):
    """A ``CheckpointStore`` on a Modal Volume mounted at ``mount``.

    ``local`` is where the mount is seen from this process: the same path in a real container; a
    per-container directory under the fake control plane. Paths the store hands out (the adapter
    directory the trainer sends to its sampler) are in mount terms, so they mean the same thing in
    every container.
    """

    def __init__(self, mount: str = VOLUME_MOUNT, *, volume: Volume | None = None, local: Path | str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.mount = PurePosixPath(mount)
        self.local = Path(local if local is not None else mount)
        self.volume = volume
        self._sleep = sleep
        super().__init__(self.local / "runs")

    # ---- commit after writes, reload before reads ---------------------------------------------
    def create(self, run_id: str, kind: str, name: str, **kw: Any) -> tuple[Path, Checkpoint]:
        directory, ckpt = super().create(run_id, kind, name, **kw)
        self.commit()  # before the trainer notifies the sampler: it must see these files
        return self._to_mount(directory), ckpt

    def resolve(self, path: str, *, kind: str | None = None) -> Path:
        self._reload_for_read()
        return super().resolve(self._to_local(path), kind=kind)

    def list(self, run_id: str) -> list[Checkpoint]:
        self._reload_for_read()
        return super().list(run_id)

    def get(self, checkpoint_id: str) -> tuple[Checkpoint, Path]:
        self._reload_for_read()
        return super().get(checkpoint_id)

    def files(self, *args: Any, **kw: Any) -> Any:
        self._reload_for_read()
        return super().files(*args, **kw)

    def commit(self) -> None:
        if self.volume is not None:
            self.volume.commit()

    def reload(self) -> None:
        """``volume.reload()``, retried while Modal refuses it (open files); blocking: call it from a
        worker thread (``VolumeSyncMiddleware``) or at start-up."""
        if self.volume is None:
            return
        try:
            for attempt in volume_reload_retrying(self._sleep):
                with attempt:
                    self.volume.reload()
        except tenacity.RetryError as exc:
            raise VolumeReloadError(
                f"the checkpoint Volume could not be reloaded after {RELOAD_ATTEMPTS} attempts "
                f"({exc.last_attempt.exception()}); files written by other containers are not visible yet") from None

    def _reload_for_read(self) -> None:
        if _synced.get():
            return  # the middleware reloaded in a worker thread for this request
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.reload()  # a worker thread or start-up: blocking is fine here
            return
        log.debug("checkpoint read on the event loop without a prior reload; using the current view")

    def exists_locally(self, path: str) -> bool:
        local = self._to_local(path)
        return local.startswith("/") and Path(local).exists()

    # ---- mount <-> local paths (the identity in a real container) ------------------------------
    def _to_mount(self, directory: Path) -> Path:
        try:
            return Path(self.mount / directory.relative_to(self.local))
        except ValueError:
            return directory

    def _to_local(self, path: str) -> str:
        if isinstance(path, str) and path.startswith("/"):
            p = PurePosixPath(path)
            if p == self.mount or self.mount in p.parents:
                return str(self.local / p.relative_to(self.mount))
        return path


# ---- the ASGI side --------------------------------------------------------------------------------
READS = {"trainer": ("/load_state", "/load_state_with_optimizer", "/checkpoints", "/checkpoint_files"),
         "sampler": ("/v1/load_lora_adapter",)}
SAMPLES = ("/sample", "/v1/completions")


class VolumeSyncMiddleware:
    """Reloads the Volume in a worker thread before requests that read checkpoints; on a sampler,
    records published versions and loads them back first thing in a new container."""

    def __init__(self, app: Any, store: VolumeCheckpointStore, role: str, *, journal: "PublishedJournal | None" = None,
                 api_key: str | None = None, stamp: Any = None):
        self.app = app
        self.store = store
        self.role = role
        self.journal = journal
        self.api_key = api_key
        self.stamp = stamp  # the server's IncarnationMiddleware (its ``value`` goes on every answer)
        self._restored = journal is None
        self._replaying = False  # restoring: the journal already holds these versions
        self._restore_lock: asyncio.Lock | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._restored:
            await self._restore()
        await self._handle(scope, receive, send)

    async def _handle(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope["path"]
        needs = path in READS.get(self.role, ())
        if path in SAMPLES:
            headers = dict(scope["headers"])
            ckpt = headers.get(b"x-checkpoint-path", b"").decode()
            needs = bool(ckpt) and not self.store.exists_locally(ckpt)
        if needs:
            try:
                await asyncio.to_thread(self.store.reload)
            except VolumeReloadError as exc:
                from starlette.responses import JSONResponse

                await JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "2"})(scope, receive, send)
                return
        token = _synced.set(needs)
        try:
            if (self.journal is not None and not self._replaying and path == "/v1/load_lora_adapter"
                    and scope["method"] == "POST"):
                await self._load_and_record(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            _synced.reset(token)

    async def _load_and_record(self, scope: dict, receive: Callable, send: Callable) -> None:
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        status, answer = [0], []

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await self.app(scope, replay, capture)
        if status[0] == 200 and self.journal is not None:
            try:
                request, result = json.loads(body), json.loads(b"".join(answer))
                await asyncio.to_thread(self.journal.record, request, result.get("policy_version"),
                                        self._incarnation())
            except Exception as exc:  # serving goes on; only a restart would miss this version
                log.warning("could not record published version on the Volume: %s", exc)

    async def _restore(self) -> None:
        if self._restore_lock is None:
            self._restore_lock = asyncio.Lock()
        async with self._restore_lock:
            if self._restored or self.journal is None:
                return
            incarnation, entries = await asyncio.to_thread(self.journal.load)
            headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else {}
            transport = httpx.ASGITransport(app=self._handle)  # the real route, after a reload
            restored, self._replaying = 0, True
            async with httpx.AsyncClient(transport=transport, base_url="http://sampler", headers=headers) as client:
                for e in entries:
                    r = await client.post("/v1/load_lora_adapter", json=e)
                    if r.status_code == 200:
                        restored += 1
                    else:
                        log.warning("could not restore published version %s: %s %s", e.get("policy_version"),
                                    r.status_code, r.text[:200])
            self._replaying = False
            if incarnation and restored == len(entries) and self.stamp is not None:
                self.stamp.value = incarnation.encode()  # the same sampler, as far as any client can tell
            elif entries:
                await asyncio.to_thread(self.journal.save, self._incarnation(), entries)
            self._restored = True  # only now: requests that arrived meanwhile waited on the lock
            if entries:
                log.warning("restored %d published version(s) from the Volume", len(entries))


    def _incarnation(self) -> str | None:
        value = getattr(self.stamp, "value", None)
        return value.decode() if isinstance(value, bytes) else None


class PublishedJournal:
    """The versions a sampler serves, on the Volume (``published/<run_id>.json``)."""

    def __init__(self, store: VolumeCheckpointStore, run_id: str, keep: int = 4):
        self.store = store
        self.path = store.local / "published" / f"{run_id}.json"
        self.keep = keep

    def load(self) -> tuple[str | None, list[dict]]:
        """The recorded incarnation and the newest versions, oldest first."""
        self.store.reload()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None, []
        return data.get("incarnation"), sorted(data.get("versions", []), key=lambda e: e["policy_version"])

    def save(self, incarnation: str | None, versions: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"incarnation": incarnation, "versions": versions}))
        self.store.commit()

    def record(self, request: dict, version: int | None, incarnation: str | None) -> None:
        """Record a published version: the load request as sent (its run included), at ``version``."""
        name, path, run = request.get("lora_name"), request.get("lora_path"), request.get("run_id")
        if not (name and path and isinstance(version, int)):
            return
        try:
            versions = json.loads(self.path.read_text()).get("versions", [])
        except (OSError, ValueError, AttributeError):
            versions = []
        versions = [e for e in versions if (e.get("run_id"), e.get("policy_version")) != (run, version)]
        versions.append({"lora_name": name, "lora_path": path, "policy_version": version, "run_id": run,
                         "default_run": bool(request.get("default_run"))})
        newest: dict = {}
        for e in sorted(versions, key=lambda e: e["policy_version"]):  # keep each run's newest few
            newest.setdefault(e.get("run_id"), []).append(e)
        self.save(incarnation, sorted((e for es in newest.values() for e in es[-self.keep:]),
                                      key=lambda e: e["policy_version"]))
