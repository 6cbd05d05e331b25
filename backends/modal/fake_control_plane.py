"""A fake of Modal's gRPC control plane on loopback: a STAND-IN for Modal's servers, never for
the ``modal`` client, which runs unmodified against it.

It is built on what the modal wheel ships for its own tests (the generated servicer base
``modal_proto.api_grpc.ModalClientBase`` and ``modal._utils.grpc_testing.patch_mock_servicer``,
which answers UNIMPLEMENTED for every RPC not written here and gives ``.intercept()`` for
asserting on calls), and the client is pointed at it the way Modal's own test-suite does it:
``MODAL_SERVER_URL`` plus dummy ``MODAL_TOKEN_ID`` / ``MODAL_TOKEN_SECRET``::

    with FakeModal().active() as fake:             # the real modal client talks to it
        service = ServiceClient(backend="modal")
        tc = service.create_lora_training_client("loops/tiny-qwen3")
        fake.endpoint("trainer").restart()        # a scripted server-side event

It implements the RPCs the backend's calls need: apps (create, publish, heartbeat, disconnect,
stop, lookup by id), images / mounts / secrets (recorded, built at once), functions and classes
(a web function gets a loopback URL), Volumes (list, read files through a block URL, remove), Dicts.
Web functions are served by ``fake_containers.WebEndpoint``: loops' own trainer and sampler
servers, started on the first request through ``app.serve_container``, the hook the real
container's ``@modal.enter()`` calls. Scripted events: ``endpoint(role).script`` (crash at start,
an ``@enter`` error, the 303 deadline), ``endpoint(role).restart()``, scale-down after the
function's ``scaledown_window``, ``volume(name).reload_conflicts``, ``rpc_delay_s`` (a slow RPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from grpclib import GRPCError, Status
from grpclib.server import Server
from google.protobuf.empty_pb2 import Empty
from modal._utils.grpc_testing import patch_mock_servicer
from modal_proto import api_grpc, api_pb2

from .fake_containers import Container, FakeVolume, LoopbackServer, Script, WebEndpoint

ENV = ("MODAL_SERVER_URL", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")


@dataclass
class FakeApp:
    app_id: str
    description: str
    state: int
    functions: dict[str, api_pb2.Function] = field(default_factory=dict)   # function id -> definition
    endpoints: list[WebEndpoint] = field(default_factory=list)
    last_heartbeat: float = field(default_factory=time.monotonic)
    stopped: bool = False
    stop_source: str = ""


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@patch_mock_servicer
class FakeModal(api_grpc.ModalClientBase):
    """The fake control plane (see the module docstring)."""

    def __init__(self, *, root: Path | str | None = None):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="loops-fake-modal-"))
        self.scripts: dict[str, Script] = {}             # role -> events for its next web endpoint
        self.rpc_delay_s: dict[str, float] = {}          # RPC name -> seconds it takes (e.g. a slow build)
        self.apps: dict[str, FakeApp] = {}
        self.images: dict[str, api_pb2.Image] = {}
        self.secrets: dict[str, dict[str, str]] = {}
        self.volumes: dict[str, FakeVolume] = {}          # name -> volume
        self._volume_ids: dict[str, str] = {}            # id -> name
        self.dicts: dict[str, dict[bytes, bytes]] = {}   # id -> contents
        self._dict_ids: dict[str, str] = {}              # name -> id
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.blob_http: LoopbackServer | None = None

    # ---- lifetime -------------------------------------------------------------------------------
    def start(self) -> "FakeModal":
        ready = threading.Event()

        async def serve() -> None:
            self._server = Server([self])
            await self._server.start("127.0.0.1", 0)
            port = self._server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            while self._server is not None:
                await asyncio.sleep(0.5)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, name="fake-modal-grpc", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fake Modal control plane did not start")
        self.blob_http = LoopbackServer(self._blob_app, name="fake-modal-blobs")
        return self

    def close(self) -> None:
        for app in list(self.apps.values()):
            self._stop_app(app, "fake closed")
        if self.blob_http is not None:
            self.blob_http.stop()
        server, self._server = self._server, None
        if server is not None and self._loop is not None:
            server.close()
        if self._thread is not None:
            self._thread.join(5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def active(self) -> Iterator["FakeModal"]:
        """Started, with the modal client of this process pointed at it; closed on exit."""
        import modal.client

        self.start()
        saved = {k: os.environ.get(k) for k in ENV}
        os.environ.update({"MODAL_SERVER_URL": self.url, "MODAL_TOKEN_ID": "ak-fake-loops",
                           "MODAL_TOKEN_SECRET": "as-fake-loops"})
        modal.client._Client._set_env_client(None)  # a cached client would talk to an earlier server
        try:
            yield self
        finally:
            modal.client._Client._set_env_client(None)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self.close()

    # ---- what tests look at and script ----------------------------------------------------------
    def running_apps(self) -> list[FakeApp]:
        return [a for a in self.apps.values() if not a.stopped]

    def endpoint(self, role: str, *, app_id: str | None = None) -> WebEndpoint:
        """The newest web endpoint whose app serves ``role`` (``trainer`` / ``sampler``)."""
        for app in reversed(list(self.apps.values())):
            if (app_id is None or app.app_id == app_id) and app.endpoints and app.description.endswith(role):
                return app.endpoints[-1]
        raise KeyError(f"no {role} endpoint")

    def volume(self, name: str) -> FakeVolume:
        with self._lock:
            if name not in self.volumes:
                self.volumes[name] = FakeVolume(name, self.root / "volumes" / name)
                self._volume_ids[_id("vo")] = name
            return self.volumes[name]

    def function_definitions(self) -> list[api_pb2.Function]:
        return [f for a in self.apps.values() for f in a.functions.values()]

    # ---- apps -------------------------------------------------------------------------------------
    async def ClientHello(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream) -> None:
        req: api_pb2.EnvironmentGetOrCreateRequest = await stream.recv_message()
        settings = api_pb2.EnvironmentSettings(image_builder_version="2025.06", webhook_suffix="fake")
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-fake", metadata=api_pb2.EnvironmentMetadata(name=req.deployment_name or "main",
                                                                           settings=settings)))

    async def AppCreate(self, stream) -> None:
        req: api_pb2.AppCreateRequest = await stream.recv_message()
        app = FakeApp(app_id=_id("ap"), description=req.description, state=req.app_state)
        self.apps[app.app_id] = app
        await stream.send_message(api_pb2.AppCreateResponse(
            app_id=app.app_id, app_page_url=f"https://modal.invalid/apps/{app.app_id}",
            app_logs_url=f"https://modal.invalid/logs/{app.app_id}"))

    async def AppGetLayout(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.AppGetLayoutResponse(app_layout=api_pb2.AppLayout()))

    async def AppHeartbeat(self, stream) -> None:
        req = await stream.recv_message()
        if req.app_id in self.apps:
            self.apps[req.app_id].last_heartbeat = time.monotonic()
        await stream.send_message(Empty())

    async def AppPublish(self, stream) -> None:
        req: api_pb2.AppPublishRequest = await stream.recv_message()
        self._app(req.app_id).state = req.app_state
        await stream.send_message(api_pb2.AppPublishResponse(url=f"https://modal.invalid/apps/{req.app_id}"))

    async def AppClientDisconnect(self, stream) -> None:
        req: api_pb2.AppClientDisconnectRequest = await stream.recv_message()
        app = self._app(req.app_id)
        if app.state != api_pb2.APP_STATE_DETACHED:  # an ephemeral app ends with its client
            await asyncio.to_thread(self._stop_app, app, "client disconnected")
        await stream.send_message(Empty())

    async def AppStop(self, stream) -> None:
        req: api_pb2.AppStopRequest = await stream.recv_message()
        await asyncio.to_thread(self._stop_app, self._app(req.app_id), "stopped")
        await stream.send_message(Empty())

    async def AppGetOrCreate(self, stream) -> None:
        req: api_pb2.AppGetOrCreateRequest = await stream.recv_message()
        if req.app_name not in self.apps:  # App.lookup(app_id); the fake deploys nothing by name
            raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=req.app_name))

    def _app(self, app_id: str) -> FakeApp:
        app = self.apps.get(app_id)
        if app is None:
            raise GRPCError(Status.NOT_FOUND, f"App {app_id} not found")
        return app

    def _stop_app(self, app: FakeApp, why: str) -> None:
        if app.stopped:
            return
        app.stopped, app.stop_source = True, why
        for ep in app.endpoints:
            ep.stop()

    # ---- images, mounts, secrets --------------------------------------------------------------------
    async def ImageGetOrCreate(self, stream) -> None:
        req: api_pb2.ImageGetOrCreateRequest = await stream.recv_message()
        image_id = _id("im")
        self.images[image_id] = req.image
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(
            image_id=image_id, result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)))

    async def MountGetOrCreate(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.MountGetOrCreateResponse(
            mount_id=_id("mo"), handle_metadata=api_pb2.MountHandleMetadata()))

    async def MountBatchedCheckExistence(self, stream) -> None:
        await stream.recv_message()  # nothing is missing: the fake runs this process's source
        await stream.send_message(api_pb2.MountBatchedCheckExistenceResponse())

    async def MountPutFile(self, stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.MountPutFileResponse(exists=True))

    async def SecretGetOrCreate(self, stream) -> None:
        req: api_pb2.SecretGetOrCreateRequest = await stream.recv_message()
        secret_id = _id("st")
        self.secrets[secret_id] = dict(req.env_dict)
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret_id))

    # ---- functions and classes ----------------------------------------------------------------------
    async def FunctionPrecreate(self, stream) -> None:
        req: api_pb2.FunctionPrecreateRequest = await stream.recv_message()
        function_id = _id("fu")
        await stream.send_message(api_pb2.FunctionPrecreateResponse(
            function_id=function_id, handle_metadata=self._metadata(req.app_id, req.function_name, req.function_type,
                                                                    dict(req.method_definitions), {})))

    async def FunctionCreate(self, stream) -> None:
        req: api_pb2.FunctionCreateRequest = await stream.recv_message()
        await asyncio.sleep(self.rpc_delay_s.get("FunctionCreate", 0.0))
        app = self._app(req.app_id)
        if req.HasField("function_data"):  # a GPU list: one definition per fallback, ranked
            data = req.function_data
            fn = data.ranked_functions[0].function
        else:
            fn = req.function
            data = api_pb2.FunctionData(ranked_functions=[api_pb2.FunctionData.RankedFunction(rank=0, function=fn)])
        function_id = req.existing_function_id or _id("fu")
        app.functions[function_id] = fn
        urls = {}
        for name, method in fn.method_definitions.items():
            if method.HasField("webhook_config") and method.webhook_config.type:
                ep = await asyncio.to_thread(self._endpoint_for, app, fn)
                urls[name] = ep.url
        await stream.send_message(api_pb2.FunctionCreateResponse(
            function_id=function_id, function=fn, function_data=data,
            handle_metadata=self._metadata(req.app_id, fn.function_name, fn.function_type,
                                           dict(fn.method_definitions), urls)))

    async def ClassCreate(self, stream) -> None:
        await stream.recv_message()  # only_class_function: the class is its service function
        await stream.send_message(api_pb2.ClassCreateResponse(class_id=_id("cs"),
                                                               handle_metadata=api_pb2.ClassHandleMetadata()))

    def _metadata(self, app_id: str, name: str, ftype: int, methods: dict,
                  urls: dict) -> api_pb2.FunctionHandleMetadata:
        md = api_pb2.FunctionHandleMetadata(function_name=name, function_type=ftype, app_id=app_id)
        for mname, mdef in methods.items():
            md.method_handle_metadata[mname].CopyFrom(api_pb2.FunctionHandleMetadata(
                function_name=f"{name.split('.')[0]}.{mname}", function_type=mdef.function_type, is_method=True,
                use_method_name=mname, web_url=urls.get(mname, ""), app_id=app_id))
        return md

    def _endpoint_for(self, app: FakeApp, fn: api_pb2.Function) -> WebEndpoint:
        """The web endpoint of a class: its container is loops' server, built by the app's own hook."""
        module = importlib.import_module(fn.module_name)
        user_cls = getattr(module, fn.function_name.split(".")[0])
        env: dict[str, str] = {}
        for secret_id in fn.secret_ids:
            env.update(self.secrets.get(secret_id, {}))
        mounts = [(m.mount_path, self._volume_ids.get(m.volume_id)) for m in fn.volume_mounts]
        counter = [0]

        def start(script: Script) -> Container:
            script.starts += 1
            counter[0] += 1
            if script.crash_at_start > 0:
                script.crash_at_start -= 1
                raise RuntimeError("scripted: the container process died at start")
            views = [self.volume(name).view(self.root / "containers" / app.app_id / str(counter[0]) / name)
                     for _, name in mounts if name]
            config_mount = env.get("LOOPS_MODAL_MOUNT", "/loops-volume")
            view = next((v for (path, _), v in zip(mounts, views) if path == config_mount), None)
            error, script.enter_error = script.enter_error, None
            server = module.serve_container(user_cls.role, env, volume=view, local=view.dir if view else None,
                                            fail=error)
            return Container(server=server, views=views)

        idle = float(fn.task_idle_timeout_secs or 300)
        ep = WebEndpoint(app_id=app.app_id, label=app.description, start=start, idle_s=idle,
                         script=self.scripts.pop(user_cls.role, None))
        app.endpoints.append(ep)
        return ep

    # ---- Volumes ------------------------------------------------------------------------------------
    async def VolumeGetOrCreate(self, stream) -> None:
        req: api_pb2.VolumeGetOrCreateRequest = await stream.recv_message()
        name = req.deployment_name
        if name not in self.volumes and req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
            raise GRPCError(Status.NOT_FOUND, f"Volume '{name}' not found")
        self.volume(name)
        volume_id = next(i for i, n in self._volume_ids.items() if n == name)
        await stream.send_message(api_pb2.VolumeGetOrCreateResponse(
            volume_id=volume_id, version=api_pb2.VOLUME_FS_VERSION_V2,
            metadata=api_pb2.VolumeMetadata(name=name, version=api_pb2.VOLUME_FS_VERSION_V2)))

    def _volume_root(self, volume_id: str) -> Path:
        name = self._volume_ids.get(volume_id)
        if name is None:
            raise GRPCError(Status.NOT_FOUND, f"Volume {volume_id} not found")
        return self.volumes[name].root

    async def VolumeListFiles2(self, stream) -> None:
        req: api_pb2.VolumeListFiles2Request = await stream.recv_message()
        root = self._volume_root(req.volume_id)
        base = root / req.path.lstrip("/")
        if not base.exists():
            raise GRPCError(Status.NOT_FOUND, f"No such file or directory: {req.path}")
        paths = [base] if base.is_file() else sorted(base.rglob("*") if req.recursive else base.iterdir())
        entries = []
        for p in paths:
            st = p.stat()
            entries.append(api_pb2.FileEntry(
                path=str(p.relative_to(root)), size=st.st_size if p.is_file() else 0, mtime=int(st.st_mtime),
                type=api_pb2.FileEntry.FileType.FILE if p.is_file() else api_pb2.FileEntry.FileType.DIRECTORY))
        await stream.send_message(api_pb2.VolumeListFiles2Response(entries=entries))

    async def VolumeGetFile2(self, stream) -> None:
        req: api_pb2.VolumeGetFile2Request = await stream.recv_message()
        p = self._volume_root(req.volume_id) / req.path.lstrip("/")
        if not p.is_file():
            raise GRPCError(Status.NOT_FOUND, f"No such file: {req.path}")
        data = p.read_bytes()
        block = 8 * 1024 * 1024  # modal's BLOCK_SIZE: one URL per block
        urls = []
        for start in range(0, max(len(data), 1), block):
            token = uuid.uuid4().hex
            self._blobs[token] = data[start:start + block]
            assert self.blob_http is not None
            urls.append(f"{self.blob_http.url}/blocks/{token}")
        await stream.send_message(api_pb2.VolumeGetFile2Response(get_urls=urls, size=len(data), start=0,
                                                                 len=len(data)))

    async def VolumeRemoveFile2(self, stream) -> None:
        req: api_pb2.VolumeRemoveFile2Request = await stream.recv_message()
        root = self._volume_root(req.volume_id)
        p = root / req.path.lstrip("/")
        if not p.exists() or p == root:
            raise GRPCError(Status.NOT_FOUND, f"No such file or directory: {req.path}")
        if p.is_dir():
            if not req.recursive:
                raise GRPCError(Status.INVALID_ARGUMENT, f"{req.path} is a directory; pass recursive=True")
            shutil.rmtree(p)
        else:
            p.unlink()
        await stream.send_message(Empty())

    async def _blob_app(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import Response

        token = scope["path"].rsplit("/", 1)[-1]
        data = self._blobs.pop(token, None)
        await (Response(data) if data is not None else Response(b"no such block", 404))(scope, receive, send)

    # ---- Dicts (the session records) ------------------------------------------------------------------
    async def DictGetOrCreate(self, stream) -> None:
        req: api_pb2.DictGetOrCreateRequest = await stream.recv_message()
        name = req.deployment_name
        if name not in self._dict_ids:
            if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"Dict '{name}' not found")
            self._dict_ids[name] = _id("di")
            self.dicts[self._dict_ids[name]] = {}
        await stream.send_message(api_pb2.DictGetOrCreateResponse(dict_id=self._dict_ids[name]))

    async def DictGet(self, stream) -> None:
        req: api_pb2.DictGetRequest = await stream.recv_message()
        value = self.dicts[req.dict_id].get(req.key)
        await stream.send_message(api_pb2.DictGetResponse(found=value is not None, value=value or b""))

    async def DictUpdate(self, stream) -> None:
        req: api_pb2.DictUpdateRequest = await stream.recv_message()
        for entry in req.updates:
            self.dicts[req.dict_id][entry.key] = entry.value
        await stream.send_message(api_pb2.DictUpdateResponse(created=True))


def main() -> None:
    """``python -m loops_backends.modal.fake_control_plane``: serve a fake for scripts (the
    quickstart, a notebook) until interrupted; prints the environment that points modal at it."""
    import signal

    fake = FakeModal().start()
    print(f"export MODAL_SERVER_URL={fake.url} MODAL_TOKEN_ID=ak-fake-loops MODAL_TOKEN_SECRET=as-fake-loops",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.close()


if __name__ == "__main__":
    main()
