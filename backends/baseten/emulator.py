"""An emulator of the Baseten Loops control plane, on loopback, for tests and offline work.

::

    loops emulate baseten [--port N] [--engine local|fake] [--api-key-file F]   (or LOOPS_EMULATOR_API_KEY)

It answers the control-plane routes the client uses, in the shapes of the protocol notes, and
provisions real trainer and sampler servers behind a gateway (``emulator_deployments``):

    POST /v1/loops/sessions                          {"session": {"id"}}
    POST /v1/loops/trainers                          {"run": {"id", "base_model", "base_url", "deployment_id", ...}}
    POST /v1/loops/samplers                          {"sampler": {"id", "base_url", "model_id", "deployment_id"}}
    POST /v1/loops/debug/{trainers,samplers}         the same, plus "scope" and "debug_version" (internal)
    GET  /v1/teams                                   {"teams": [{"id", "name"}]}
    *    /v1/teams/{team_id}/loops/...               the create routes above, in that team (404: no such team)
    GET  /v1/loops/deployments/{id}                  {"deployment": {"status": {"name"}}}
    GET  /v1/models/{model_id}/deployments/{id}      {"status": "ACTIVE" | "SCALED_TO_ZERO" | ...}
    GET  /v1/loops/capabilities                      {"supported_models": [...]}
    GET  /v1/loops/checkpoints?run_id=|checkpoint_path=   {"checkpoints": [...]}
    GET  /v1/loops/checkpoints/{id}/files            {"presigned_urls", "next_page_token", "total_count"}
    GET  /v1/loops/checkpoints/{id}/source           {"source": {"kind": "s3"}}
    POST /v1/loops/checkpoints/validate              {checkpoint_path, run_id} -> 200 | 400 | 404
    *    /gw/{deployment_id}/sync/...                the trainer or sampler server;  POST /gw/{id}/wake
    GET  /_files?...&expires=&signature=             presigned file download (no API key)
    POST /_emulator/faults, /_emulator/deployments/{id}; GET /_emulator/state[?requests=N]  test controls

Every route but ``/_files`` needs ``Authorization: Api-Key <key>``: 401 without it, 403 for a wrong
key. Checkpoints come from the ``LOOPS_HOME`` store that the servers write.

Only the base models in ``models`` (``--model``, repeatable; default ``loops/tiny-qwen3``) are
provisioned: any other is a 400 naming the supported ones, as ``GET /v1/loops/capabilities`` lists
them. A sampler or trainer made through the debug route with ``scope: "serverless"`` is serverless:
``model_id`` / ``deployment_id`` null, a sampler answering ``/sample`` through the Loops queue
(``emulator_serverless``), every request naming its run or sampler (400 from the gateway otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
import uuid
from typing import Any, Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loops_core.checkpoints import CheckpointStore, read_meta
from loops_core.errors import InvalidRequestError, NotFoundError
from loops_core.server.http import guarded, json_body

from .emulator_checkpoints import CheckpointRoutes
from .emulator_deployments import Deployment, FakeProvisioner, LocalProvisioner
from .emulator_faults import Faults, base_url, error
from .emulator_gateway import gateway
from .emulator_serverless import SampleQueue
from .models import SCALED_TO_ZERO

SUPPORTED_MODELS = [{"model_name": "loops/tiny-qwen3", "max_context_length": 2048}]
TEAMS = ({"id": "team-emulator-default", "name": "default"}, {"id": "team-emulator-loops", "name": "loops-emulator"})
TRAINER_SCOPES = ("default", "serverless", "team", "deployment")
SAMPLER_SCOPES = ("default", "serverless", "deployment")


class Emulator:
    """The control plane as an ASGI app (``self``); ``running()`` serves it on a loopback port in a
    background thread. Faults are set through ``faults`` or ``POST /_emulator/faults``."""

    def __init__(self, *, api_key: str = "emulator-key", engine: str = "fake", host: str = "127.0.0.1",
                 port: int = 0, faults: Faults | None = None, url_ttl_s: float = 3600.0,
                 store: CheckpointStore | None = None, server_engine: str = "local", sampler_engine: str = "auto",
                 models: list[str] | None = None, teams: tuple[dict[str, str], ...] = TEAMS):
        if engine not in ("fake", "local"):
            raise ValueError(f"engine must be 'fake' or 'local', got {engine!r}")
        self.api_key = api_key
        self.host, self.port = host, port
        self.faults = faults or Faults()
        self.url_ttl_s = url_ttl_s
        self.models = [{"model_name": m, "max_context_length": 2048} for m in models] if models else SUPPORTED_MODELS
        self.teams = list(teams)
        self.store = store or CheckpointStore()
        self.provisioner = FakeProvisioner(self.store) if engine == "fake" else \
            LocalProvisioner(server_engine=server_engine, sampler_engine=sampler_engine)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, Deployment] = {}
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=20_000)
        self.url: str | None = None
        self.checkpoints = CheckpointRoutes(self)
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        routes = [
            Route("/v1/loops/sessions", self._create_session, methods=["POST"]),
            Route("/v1/loops/trainers", self._create_trainer, methods=["POST"]),
            Route("/v1/loops/samplers", self._create_sampler, methods=["POST"]),
            Route("/v1/loops/debug/trainers", self._create_trainer, methods=["POST"]),
            Route("/v1/loops/debug/samplers", self._create_sampler, methods=["POST"]),
            Route("/v1/teams", self._list_teams, methods=["GET"]),
            Route("/v1/loops/deployments/{dep_id}", self._trainer_status, methods=["GET"]),
            Route("/v1/models/{model_id}/deployments/{dep_id}", self._sampler_status, methods=["GET"]),
            Route("/v1/loops/capabilities", self._capabilities, methods=["GET"]),
            Route("/v1/loops/checkpoints", self.checkpoints.list, methods=["GET"]),
            Route("/v1/loops/checkpoints/validate", self.checkpoints.validate, methods=["POST"]),
            Route("/v1/loops/checkpoints/{cid:path}/source", self.checkpoints.source, methods=["GET"]),
            Route("/v1/loops/checkpoints/{cid:path}/files", self.checkpoints.files, methods=["GET"]),
            Route("/_files", self.checkpoints.download, methods=["GET"]),
            Route("/_emulator/faults", self._set_faults, methods=["POST"]),
            Route("/_emulator/deployments/{dep_id}", self._set_deployment, methods=["POST"]),
            Route("/_emulator/state", self._state, methods=["GET"]),
        ]
        self._routes = Starlette(routes=routes)

    # ---- the front door: auth, faults, gateway ------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record = {"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                  "auth_scheme": headers.get("authorization", "").partition(" ")[0],
                  **{k: headers.get(k) for k in ("user-agent", "x-baseten-accept-error", "x-run-id", "x-sampler-id",
                                                 "idempotency-key", "x-checkpoint-path", "x-min-policy-version")}}
        self.requests.append(record)
        scope.setdefault("state", {})["record"] = record
        if path != "/_files":
            denied = self._check_key(headers.get("authorization", ""), gateway=path.startswith("/gw/"))
            if denied is not None:
                return await denied(scope, receive, send)
        if path.startswith("/gw/"):
            return await gateway(self, scope, receive, send, headers)
        if path.startswith("/v1/teams/"):
            _, _, _, team_id, *rest = path.split("/", 4)
            if not any(t["id"] == team_id for t in self.teams):
                return await error(404, f"team {team_id!r} not found: GET /v1/teams lists them")(scope, receive, send)
            if not rest or not rest[0].startswith("loops/"):
                return await error(404, f"no route {path!r}")(scope, receive, send)
            record["team_id"] = team_id
            path = "/v1/" + rest[0]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if path.startswith("/v1/") and (status := self.faults.take_burst()):
            return await error(status, f"injected fault: HTTP {status}")(scope, receive, send)
        await self._routes(scope, receive, send)

    def _check_key(self, auth: str, *, gateway: bool) -> Response | None:
        scheme, _, token = auth.partition(" ")
        source = "06" if gateway else None
        if not auth or scheme.lower() != "api-key" or not token:
            return error(401, "missing API key: send 'Authorization: Api-Key <key>'", source=source)
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return error(403, "the API key is not valid for this workspace", source=source)
        return None

    # ---- sessions and provisioning -------------------------------------------------------------
    async def _body(self, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        request.state.record["body"] = body
        return body

    def _session(self, body: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.get(str(body.get("session_id")))
        if session is None:
            raise NotFoundError(f"session {body.get('session_id')!r} not found: create one with POST /sessions",
                                status_code=404)
        return session

    @guarded
    async def _create_session(self, request: Request) -> Response:
        body = await self._body(request)
        sid = f"sess-{uuid.uuid4().hex[:12]}"
        self.sessions[sid] = {"id": sid, "training_project_id": body.get("training_project_id"), "runs": []}
        return JSONResponse({"session": {"id": sid, "training_project_id": body.get("training_project_id"),
                                         "features": list(self.provisioner.features)}})

    @guarded
    async def _create_trainer(self, request: Request) -> Response:
        body = await self._body(request)
        session = self._session(body)
        base_model = self._supported(_text(body, "base_model"))
        serverless = self._scope(request, body, TRAINER_SCOPES) == "serverless"
        rank = _int(body, "lora_rank")
        _int(body, "replicas", 1)  # validated; the emulator runs one replica whatever was asked
        _int(body, "max_seq_len", None)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidRequestError("seed must be an integer or null", field="seed")
        if body.get("availability_model", "dedicated") not in ("dedicated", "spot"):
            raise InvalidRequestError("availability_model must be 'dedicated' or 'spot'", field="availability_model")
        try:
            reuse = self._reusable(body, base_model)
        except _Conflict as exc:
            return error(409, str(exc), reason="REUSE_UNAVAILABLE")
        if reuse is not None:
            session["runs"].append(reuse["id"])
            return JSONResponse({"run": self._run_json(request, reuse)})
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        trainer = Deployment("trainer", base_model, run_id=run_id, final=self.faults.fail_trainers or "ACTIVE",
                             pending=self.faults.pending(), serverless=serverless)
        sampler = self._new_sampler(base_model, run_id=run_id, sampler_id=f"smp-{uuid.uuid4().hex[:12]}",
                                    serverless=serverless or self.faults.serverless_samplers)
        run = {"id": run_id, "session_id": session["id"], "base_model": base_model, "trainer": trainer.id,
               "sampler": sampler.id, "sampler_id": sampler.sampler_id, "serverless": serverless,
               "training_project_id": body.get("training_project_id") or session["training_project_id"]}
        self.deployments[trainer.id] = trainer
        self.runs[run_id] = run
        session["runs"].append(run_id)
        await self._provision(trainer, self.provisioner.trainer(trainer, sampler, rank=rank, seed=seed), sampler)
        return JSONResponse({"run": self._run_json(request, run)})

    def _reusable(self, body: dict[str, Any], base_model: str) -> dict[str, Any] | None:
        """The run to reuse, None when none was asked for; 404/409 when it cannot be reused."""
        if body.get("reuse_from_run_id"):
            run = self.runs.get(str(body["reuse_from_run_id"]))
        elif body.get("reuse_from_session_id"):
            prior = self.sessions.get(str(body["reuse_from_session_id"]))
            if prior is None:
                raise NotFoundError(f"session {body['reuse_from_session_id']!r} not found", status_code=404)
            run = self.runs.get(prior["runs"][-1]) if prior["runs"] else None
        else:
            return None
        if run is None:
            raise NotFoundError("the run to reuse was not found", status_code=404)
        dep = self.deployments[run["trainer"]]
        if dep.terminal or dep.shutting_down or run["base_model"] != base_model:
            raise _Conflict(f"run {run['id']} cannot be reused (deployment {dep.status()}, base model "
                            f"{run['base_model']}); provision a new trainer")
        return run

    def _run_json(self, request: Request, run: dict[str, Any]) -> dict[str, Any]:
        return {"id": run["id"], "base_model": run["base_model"],
                "deployment_id": None if run.get("serverless") else run["trainer"],
                "base_url": f"{base_url(request)}/gw/{run['trainer']}/sync", "base_checkpoint": None,
                "session_id": run["session_id"], "training_project_id": run["training_project_id"]}

    def _new_sampler(self, base_model: str, *, run_id: str | None = None, sampler_id: str | None = None,
                     serverless: bool = False) -> Deployment:
        dep = Deployment("sampler", base_model, run_id=run_id, sampler_id=sampler_id or f"smp-{uuid.uuid4().hex[:12]}",
                         model_id=None if serverless else f"mdl-{uuid.uuid4().hex[:8]}",
                         final=self.faults.fail_samplers or "ACTIVE", pending=self.faults.pending(),
                         override=SCALED_TO_ZERO if self.faults.scaled_to_zero and not serverless else None)
        if serverless:
            dep.serverless = True
            dep.queue = SampleQueue(dep, self.faults)
        self.deployments[dep.id] = dep
        return dep

    def _supported(self, base_model: str) -> str:
        names = [m["model_name"] for m in self.models]
        if base_model not in names:
            raise InvalidRequestError(f"base_model {base_model!r} is not supported here; supported models: "
                                      f"{', '.join(names)} (GET /v1/loops/capabilities)", field="base_model")
        return base_model

    def _scope(self, request: Request, body: dict[str, Any], allowed: tuple[str, ...]) -> str:
        """The debug route's ``scope`` (the plain route has none: ``default``)."""
        if "/debug/" not in request.url.path:
            return "default"
        request.state.record["debug_version"] = body.get("debug_version")
        scope = body.get("scope", "default")
        if scope not in allowed:
            raise InvalidRequestError(f"scope must be one of {list(allowed)}, got {scope!r}", field="scope")
        return scope

    async def _list_teams(self, request: Request) -> Response:
        return JSONResponse({"teams": self.teams})

    async def _provision(self, dep: Deployment, work: Any, *also: Deployment) -> None:
        """Run the provisioner: inline when it is instant (fake), else in the background, the
        deployments reporting BUILDING until it is done."""
        async def run() -> None:
            try:
                await work
            except Exception as exc:  # the status route reports it
                for d in (dep, *also):
                    d.error = f"{type(exc).__name__}: {exc}"
                return
            for d in (dep, *also):
                d.provisioned = True

        if self.provisioner.instant:
            return await run()
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @guarded
    async def _create_sampler(self, request: Request) -> Response:
        body = await self._body(request)
        self._session(body)
        serverless = self._scope(request, body, SAMPLER_SCOPES) == "serverless" or self.faults.serverless_samplers
        if body.get("run_id"):
            run = self.runs.get(str(body["run_id"]))
            if run is None:
                raise NotFoundError(f"run {body['run_id']!r} not found", status_code=404)
            dep = self.deployments[run["sampler"]]
        else:
            if (body.get("base_model") is None) == (body.get("model_path") is None):
                raise InvalidRequestError("pass exactly one of base_model or model_path", field="base_model")
            if body.get("model_path") is not None:
                path = _text(body, "model_path")
                base_model = read_meta(self.store.resolve(path, kind="sampler_weights")).get("base_model")
                if not base_model:
                    raise InvalidRequestError(f"{path!r} does not record its base model", field="model_path")
            else:
                base_model = self._supported(_text(body, "base_model"))
            dep = self._new_sampler(base_model, serverless=serverless)
            await self._provision(dep, self.provisioner.sampler(dep))
        return JSONResponse({"sampler": {"id": dep.sampler_id, "base_url": f"{base_url(request)}/gw/{dep.id}/sync",
                                         "model_id": dep.model_id,
                                         "deployment_id": None if dep.serverless else dep.id,
                                         "base_model": dep.base_model, "base_checkpoint": None}})

    def _deployment(self, dep_id: str) -> Deployment:
        dep = self.deployments.get(dep_id)
        if dep is None:
            raise NotFoundError(f"deployment {dep_id!r} not found", status_code=404)
        return dep

    @guarded
    async def _trainer_status(self, request: Request) -> Response:
        dep = self._deployment(request.path_params["dep_id"])
        return JSONResponse({"deployment": {"id": dep.id, "status": {"name": dep.status(consume=True)},
                                            "error": dep.error}})

    @guarded
    async def _sampler_status(self, request: Request) -> Response:
        dep = self._deployment(request.path_params["dep_id"])
        if dep.model_id != request.path_params["model_id"]:
            raise NotFoundError(f"model {request.path_params['model_id']!r} has no deployment {dep.id!r}",
                                status_code=404)
        return JSONResponse({"id": dep.id, "model_id": dep.model_id, "status": dep.status(consume=True)})

    async def _capabilities(self, request: Request) -> Response:
        return JSONResponse({"supported_models": self.models})

    # ---- test controls -------------------------------------------------------------------------
    @guarded
    async def _set_faults(self, request: Request) -> Response:
        self.faults.update(**await json_body(request))
        return JSONResponse(self.faults.as_dict())

    @guarded
    async def _set_deployment(self, request: Request) -> Response:
        dep = self._deployment(request.path_params["dep_id"])
        body = await json_body(request)
        self.set_deployment(dep.id, status=body.get("status"), shutting_down=body.get("shutting_down"))
        return JSONResponse({"id": dep.id, "status": dep.status(), "shutting_down": dep.shutting_down})

    def set_deployment(self, dep_id: str, *, status: str | None = None, shutting_down: bool | None = None) -> None:
        """Force a deployment's reported status (e.g. STOPPED, PREEMPTED, SCALED_TO_ZERO) or its 503s."""
        dep = self.deployments[dep_id]
        if status is not None:
            dep.override = None if status == "ACTIVE" else status
        if shutting_down is not None:
            dep.shutting_down = bool(shutting_down)

    async def _state(self, request: Request) -> Response:
        return JSONResponse({
            "sessions": list(self.sessions.values()), "runs": list(self.runs.values()), "faults": self.faults.as_dict(),
            "deployments": [{"id": d.id, "kind": d.kind, "run_id": d.run_id, "sampler_id": d.sampler_id,
                             "status": d.status(), "health_hits": d.health_hits, "status_polls": d.status_polls,
                             "shutting_down": d.shutting_down} for d in self.deployments.values()],
            "requests": list(self.requests)[-int(request.query_params.get("requests", 0) or 0):]
            if request.query_params.get("requests") else []})

    # ---- running -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator["Emulator"]:
        """Serve on ``host:port`` (0: a free port) in a background thread; ``url`` says where."""
        import uvicorn

        from loops_core.server.run import Listener

        listener = Listener("emulator", self, self.host, self.port)
        sock = listener.bind()
        self.url = listener.url
        self._server = uvicorn.Server(uvicorn.Config(self, log_level=os.environ.get("LOOPS_LOG_LEVEL", "warning"),
                                                     lifespan="off", timeout_keep_alive=120,
                                                     timeout_graceful_shutdown=2))

        async def serve() -> None:
            try:
                await self._server.serve(sockets=[sock])
            finally:
                await self.aclose()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), name="loops-baseten-emulator",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Baseten emulator did not start")
            time.sleep(0.01)
        try:
            yield self
        finally:
            self._server.should_exit = True
            self._thread.join(15)
            sock.close()

    async def aclose(self) -> None:
        """Stop every deployment (servers, subprocesses)."""
        for task in list(self._tasks):
            task.cancel()
        for dep in list(self.deployments.values()):
            await dep.close()


class _Conflict(Exception):
    pass


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} is required (a non-empty string)", field=name)
    return value


def _int(body: dict[str, Any], name: str, default: Any = ...) -> Any:
    value = body.get(name, default)
    if value is ...:
        raise InvalidRequestError(f"{name} is required", field=name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", field=name)
    return value


def cli_main(argv: list[str]) -> int:
    """``loops emulate baseten``: run the emulator in the foreground and print what to export."""
    p = argparse.ArgumentParser(prog="loops emulate baseten", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787, help="0 picks a free port (default 8787)")
    p.add_argument("--engine", choices=["fake", "local"], default=None,
                   help="local (the default when torch is installed): torch/HF/vLLM subprocesses, real samples; "
                        "fake: numpy servers in-process (instant; its samples are not language)")
    p.add_argument("--sampler-engine", choices=["auto", "hf", "vllm"], default="auto", help="for --engine local")
    p.add_argument("--api-key", default=None, help=argparse.SUPPRESS)  # refused: `ps` shows process arguments
    p.add_argument("--api-key-file", default=None,
                   help="file holding the key clients must send (default: LOOPS_EMULATOR_API_KEY, else a random one)")
    p.add_argument("--provisioning-polls", type=int, default=0, help="fault: report BUILDING/DEPLOYING this long")
    p.add_argument("--scaled-to-zero", action="store_true", help="fault: new samplers start scaled to zero")
    p.add_argument("--serverless-samplers", action="store_true",
                   help="every new sampler is serverless (the Loops queue answers /sample with 202)")
    p.add_argument("--model", action="append", default=None,
                   help="a base model to support (repeatable; default loops/tiny-qwen3)")
    args = p.parse_args(argv)
    from loops_core.server.run import Listener, serve

    if args.api_key is not None:
        p.error("--api-key is not accepted: a key on the command line is visible to every user in `ps`. "
                "Set LOOPS_EMULATOR_API_KEY or pass --api-key-file PATH")
    if args.engine is None:
        import importlib.util

        args.engine = "local" if importlib.util.find_spec("torch") is not None else "fake"
    key = (Path(args.api_key_file).expanduser().read_text().strip() if args.api_key_file else
           os.environ.get("LOOPS_EMULATOR_API_KEY")) or f"emu-{secrets.token_hex(12)}"
    emu = Emulator(api_key=key, engine=args.engine, sampler_engine=args.sampler_engine, models=args.model,
                   faults=Faults(provisioning_polls=args.provisioning_polls, scaled_to_zero=args.scaled_to_zero,
                                 serverless_samplers=args.serverless_samplers))

    def ready(listeners: list[Listener]) -> None:
        url = listeners[0].url
        models = ", ".join(m["model_name"] for m in emu.models)
        what = ("numpy fake engine: instant, deterministic, but its samples are not language; --engine local "
                "for the torch model" if args.engine == "fake" else "torch trainer + HF/vLLM sampler")
        print(f"Baseten control-plane emulator (engine: {args.engine}, {what}; models: {models}) on {url}\n"
              f"export LOOPS_BACKEND=baseten\nexport LOOPS_BASE_URL={url}\nexport BASETEN_API_KEY={key}", flush=True)

    serve([Listener("emulator", emu, args.host, args.port)], on_ready=ready)
    return 0


__all__ = ["Emulator", "Faults", "cli_main"]
