"""The trainer server: the Loops trainer protocol around a ``TrainerEngine``, for many runs.

A trainer hosts many runs on its one base model (see ``runs.py``): each has its own adapter (rank,
seed), optimizer, accumulated gradients, policy versions and checkpoints. A request names its run
with ``run_id`` in the body, the ``X-Run-Id`` header or a ``run_id`` query parameter; one that names
none (an older client, the published client in local mode) acts on the *default run*, whose id is
the ``run_id`` the server was built with. A run that does not exist is a 404 naming it; a
``model`` / ``base_model`` other than the server's is a 400 naming both.

Routes (every submit answers 202 ``{operation_id, schema_version: 1}``; results come from
``GET /operations/{id}``)::

    POST /runs                        {lora_rank, seed?, base_model?} -> {run_id, lora_rank, step}
    POST /close_run                   {run_id}                        -> {run_id, closed: true}
    GET  /runs                                                        -> {runs: [{run_id, lora_rank, ...}]}
    POST /init_trainer_server         {lora_rank, seed?}             -> {step, lora_rank}  (resets the run)
    POST /forward_backward, /forward  {data, loss_fn, loss_fn_config} -> ForwardBackwardOutput
    POST /optim_step                  {adam_params}                  -> {metrics}
    POST /save_state                  {name, ttl_seconds?}           -> {mode, path}
    POST /save_weights_for_sampler    {name, bump_version?}          -> {version, path}
    POST /load_state[_with_optimizer] {path}                         -> {step, path}
    GET  /operations/{id}             long-poll: 200 done|error, 408 re-poll, 404 unknown
    GET  /health  /policy_version  /get_info  /checkpoints        (per run, as above)

Requests are validated before they are queued, so bad input is a 400 at submit time and never
reaches the engine: state stays as it was. Every field the published client sends (``model``,
``seq_id``, ``run_id``, ``base_model``, ...) is accepted; unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import uuid
from typing import Any, Callable
from urllib.parse import unquote

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..checkpoints import CheckpointStore, check_name
from ..engine import DEFAULT_RUN, MAX_TOP_K_LOGPROBS, TrainerEngine
from ..errors import InvalidRequestError, NotFoundError
from ..losses import validate_batch
from ..types import AdamParams, Datum, ForwardBackwardOutput
from .stats import stats_route
from .incarnation import IncarnationMiddleware
from ..wire import Endpoint, WireClient
from .http import guard, error_response, guarded, json_body, pydantic_message
from .operations import OperationQueue
from .runs import Run


class TrainerServer:
    def __init__(self, engine: TrainerEngine, *, run_id: str, store: CheckpointStore | None = None,
                 sampler: Endpoint | None = None, seed: int | None = None, api_key: str | None = None,
                 poll_hold: float = 30.0, result_ttl: float = 3600.0, max_runs: int = 64):
        self.engine = engine
        self.run_id = run_id  # the default run's id
        self.store = store or CheckpointStore()
        self.sampler = sampler
        self.seed = seed
        self.poll_hold = poll_hold
        self.result_ttl = result_ttl
        self.gap_wait = 5.0  # how long a stream waits for a seq_id that never came (see runs.py)
        self.max_runs = max_runs
        self.shutting_down = False
        # The engine built its default run; requests that name no run act on it.
        self.runs: dict[str, Run] = {run_id: self._new_run(run_id, DEFAULT_RUN, engine.lora_rank)}
        self._default_claimed = False  # for engines that hold one run: the first created run takes it
        self._ops: dict[str, OperationQueue] = {}  # operation id -> its queue, for polls
        # One worker thread: the engine sees one call at a time, in order, and needs no locks.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loops-trainer")
        routes = [
            Route("/runs", self._create_run, methods=["POST"]),
            Route("/runs", self._list_runs, methods=["GET"]),
            Route("/close_run", self._close_run, methods=["POST"]),
            Route("/init_trainer_server", self._submit_route("init_trainer_server", self._init), methods=["POST"]),
            Route("/forward_backward", self._submit_route("forward_backward", self._fb(True)), methods=["POST"]),
            Route("/forward", self._submit_route("forward", self._fb(False)), methods=["POST"]),
            Route("/optim_step", self._submit_route("optim_step", self._optim), methods=["POST"]),
            Route("/save_state", self._submit_route("save_state", self._save_state), methods=["POST"]),
            Route("/save_weights_for_sampler", self._submit_route("save_weights_for_sampler", self._publish),
                  methods=["POST"]),
            Route("/load_state", self._submit_route("load_state", self._load(False)), methods=["POST"]),
            Route("/load_state_with_optimizer", self._submit_route("load_state_with_optimizer", self._load(True)),
                  methods=["POST"]),
            Route("/operations/{op_id:path}", self._poll, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/policy_version", self._policy_version, methods=["GET"]),
            Route("/get_info", self._get_info, methods=["GET", "POST"]),
            Route("/checkpoints", self._checkpoints, methods=["GET"]),
            Route("/checkpoint_files", self._checkpoint_files, methods=["GET"]),
            Route("/stats", stats_route, methods=["GET"]),
        ]
        self.app = IncarnationMiddleware(guard(Starlette(routes=routes), self, api_key=api_key, role="trainer"))

    @property
    def policy_version(self) -> int:
        """The default run's latest published version."""
        return self.runs[self.run_id].policy_version

    # ---- runs -------------------------------------------------------------------------------
    def _new_run(self, run_id: str, engine_key: str, rank: int) -> Run:
        return Run(run_id, engine_key, rank,
                   new_queue=lambda: OperationQueue(ttl=self.result_ttl, gap_wait=self.gap_wait))

    def _run_of(self, request: Request, body: dict[str, Any] | None = None) -> Run:
        """The run a request names (body ``run_id`` > ``X-Run-Id`` > ``?run_id=``), else the default run."""
        rid = (body or {}).get("run_id") or request.headers.get("x-run-id") or request.query_params.get("run_id")
        if rid is None or rid == "":
            return self.runs[self.run_id]
        if not isinstance(rid, str):
            raise InvalidRequestError("run_id must be a string", field="run_id")
        run = self.runs.get(rid)
        if run is None or run.closing:
            raise NotFoundError(f"run {rid!r} does not exist on this trainer (closed, or never created here: "
                                "create a training client to get a run)", status_code=404)
        return run

    def _check_model(self, body: dict[str, Any]) -> None:
        for key in ("base_model", "model"):
            name = body.get(key)
            if name is not None and name != self.engine.base_model:
                raise InvalidRequestError(
                    f"{key} {name!r} differs from this trainer's base model {self.engine.base_model!r}: a trainer "
                    f"serves one base model; create the client with base_model={self.engine.base_model!r} or use a "
                    "trainer started for your model", field=key)

    async def create_run(self, rank: int, seed: int | None = None, run_id: str | None = None) -> Run:
        """Start a run with a fresh adapter of ``rank`` (also used in-process by the fake backend)."""
        if self.shutting_down:
            raise ServerBusyError("the trainer is shutting down; retry on another replica")
        run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        if run_id in self.runs:
            raise InvalidRequestError(f"run {run_id!r} exists already", field="run_id")
        if not self.engine.holds_many_runs():
            default = self.runs[self.run_id]
            if self._default_claimed or default.depth or default.policy_version:
                raise ServerBusyError(f"this trainer's engine ({type(self.engine).__name__}) holds one run, and "
                                      "it is taken; start another trainer for another run")
            self._default_claimed = True
            run = self._new_run(run_id, DEFAULT_RUN, rank)
            await self._call(run, self.engine.init_lora, rank, seed)
        else:
            live = [r for r in self.runs.values() if not r.closing]
            if len(live) >= self.max_runs:
                raise ServerBusyError(f"this trainer holds its maximum of {self.max_runs} runs; close a training "
                                      "client (TrainingClient.close) or start another trainer")
            run = self._new_run(run_id, run_id, rank)
            self.runs[run_id] = run  # reserved now, so concurrent creates count it
            try:
                await self._call(None, self.engine.init_lora, rank, seed, run=run_id)
            except BaseException:
                del self.runs[run_id]
                raise
        self.runs[run_id] = run
        return run

    @guarded
    async def _create_run(self, request: Request) -> Response:
        body = await json_body(request)
        self._check_model(body)
        rank, seed = _rank_and_seed(body, self.seed)
        rid = body.get("run_id")
        if rid is not None and (not isinstance(rid, str) or not _RUN_ID.match(rid)):
            raise InvalidRequestError("run_id must be letters, digits, '.', '_' or '-' (at most 64)", field="run_id")
        try:
            run = await self.create_run(rank, seed, rid)
        except ServerBusyError as exc:
            return error_response(503, str(exc))
        return JSONResponse({"run_id": run.id, "lora_rank": rank, "step": 0, "base_model": self.engine.base_model})

    @guarded
    async def _close_run(self, request: Request) -> Response:
        body = await json_body(request)
        run = self._run_of(request, body)
        if run.id == self.run_id:
            raise InvalidRequestError("the default run cannot be closed (reset it with init_trainer_server)",
                                      field="run_id")
        await self.close_run(run.id)
        return JSONResponse({"run_id": run.id, "closed": True})

    async def close_run(self, run_id: str) -> None:
        """Let the run's queued operations finish, then free its adapter and optimizer."""
        run = self.runs.get(run_id)
        if run is None or run.closing:
            return
        run.closing = True  # new submissions get 404 from now on
        while run.depth:
            await asyncio.sleep(0.01)
        if run.engine_key != DEFAULT_RUN:
            await self._call(None, self.engine.close_run, run.engine_key)
        else:
            self._default_claimed = False
        run.close()
        del self.runs[run_id]

    async def _list_runs(self, request: Request) -> Response:
        runs = [{"run_id": r.id, "lora_rank": r.lora_rank, "step": r.step, "policy_version": r.policy_version,
                 "queue_depth": r.depth, "default": r.id == self.run_id} for r in self.runs.values()]
        return JSONResponse({"many_runs": self.engine.holds_many_runs(), "runs": runs})

    # ---- plumbing -------------------------------------------------------------------------
    async def _call(self, current: Run | None, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run ``fn`` on the engine worker, with ``current`` made the engine's current run first."""
        def job() -> Any:
            if current is not None:
                self.engine.use_run(current.engine_key)
            return fn(*args, **kw)

        return await asyncio.get_running_loop().run_in_executor(self._worker, job)

    def _submit_route(self, name: str, prepare: Callable[[Run, dict[str, Any], Headers], Any]):
        """A POST route: validate with ``prepare(run, body, headers)`` (which returns the op coroutine fn),
        queue it."""

        @guarded
        async def route(request: Request) -> Response:
            if self.shutting_down:
                return error_response(503, "the trainer is shutting down; retry on another replica")
            body = await json_body(request)
            run = self._run_of(request, body)
            key = request.headers.get("idempotency-key") or None
            if key and (known := run.find(key)) is not None:
                return _accepted(known.id)
            seq_id = body.get("seq_id")
            if seq_id is not None and (not isinstance(seq_id, int) or isinstance(seq_id, bool)):
                raise InvalidRequestError("seq_id must be an integer", field="seq_id")
            queue = run.queue_for(seq_id)
            try:
                self._check_model(body)
                fn = prepare(run, body, request.headers)
            except Exception:
                queue.refuse(seq_id)  # its turn is over: the next one need not wait for it
                raise
            op, _ = queue.submit(name, fn, key=key, seq_id=seq_id)
            self._index(op.id, queue)
            return _accepted(op.id)

        return route

    def _index(self, op_id: str, queue: OperationQueue) -> None:
        self._ops[op_id] = queue
        if len(self._ops) > 4 * _INDEX_PRUNE:  # forget operations their queues have evicted
            self._ops = {k: q for k, q in self._ops.items() if q.get(k) is not None}

    # ---- operations: each ``prepare`` validates now and returns what runs later -------------
    def _init(self, run: Run, body: dict[str, Any], headers: Headers):
        rank, seed = _rank_and_seed(body, self.seed)

        async def op() -> dict[str, Any]:
            if run.engine_key == DEFAULT_RUN:
                await self._call(run, self.engine.init_lora, rank, seed)
            else:
                await self._call(run, self.engine.init_lora, rank, seed, run=run.engine_key)
            run.lora_rank, run.step = rank, 0
            return {"step": 0, "lora_rank": rank}

        return op

    def _fb(self, backward: bool):
        def prepare(run: Run, body: dict[str, Any], headers: Headers):
            loss_fn = body.get("loss_fn") or "cross_entropy"
            raw = body.get("data")
            if not isinstance(raw, list):
                raise InvalidRequestError("data must be a list of Datum objects", field="data")
            data = []
            for i, d in enumerate(raw):
                try:
                    data.append(Datum.model_validate(d))
                except ValidationError as exc:
                    msg, fld = pydantic_message(exc, f"data[{i}].")
                    raise InvalidRequestError(msg, field=fld) from None
                if any(c.type != "encoded_text" for c in data[-1].model_input.chunks):
                    raise InvalidRequestError(f"data[{i}].model_input has an image chunk; this trainer takes text "
                                              "only", field=f"data[{i}].model_input")
            config = validate_batch(data, loss_fn, body.get("loss_fn_config"), vocab_size=self.engine.vocab_size,
                                    max_seq_len=self.engine.max_seq_len)
            top_k = body.get("top_k_logprobs") or 0
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= MAX_TOP_K_LOGPROBS:
                raise InvalidRequestError(f"top_k_logprobs must be an integer in [0, {MAX_TOP_K_LOGPROBS}]",
                                          field="top_k_logprobs")
            extra = {"top_k_logprobs": top_k} if top_k else {}  # engines without it still serve k = 0

            published = _published(headers)

            async def op() -> dict[str, Any]:
                out = await self._call(run, self.engine.forward_backward, data, loss_fn, config, backward=backward,
                                       **extra)
                return _per_datum_means(out, len(data)) if published else out.model_dump(mode="json")

            return op

        return prepare

    def _optim(self, run: Run, body: dict[str, Any], headers: Headers):
        raw = body.get("adam_params")
        if raw is None:
            raise InvalidRequestError("adam_params is required", field="adam_params")
        try:
            params = AdamParams.model_validate(raw)
        except ValidationError as exc:
            msg, fld = pydantic_message(exc, "adam_params.")
            raise InvalidRequestError(msg, field=fld) from None

        async def op() -> dict[str, Any]:
            def step() -> dict[str, float]:
                metrics = self.engine.optim_step(params)
                run.step = self.engine.step
                return metrics

            return {"metrics": await self._call(run, step)}

        return op

    def _save_state(self, run: Run, body: dict[str, Any], headers: Headers):
        name = check_name(body.get("name") or "", "name")

        async def op() -> dict[str, Any]:
            def write() -> str:
                _, ckpt = self.store.create(run.id, "weights", name, base_model=self.engine.base_model,
                                            lora_rank=self.engine.lora_rank, write=self.engine.save_state)
                return ckpt.path or ""

            return {"mode": "full", "path": await self._call(run, write)}

        return op

    def _publish(self, run: Run, body: dict[str, Any], headers: Headers):
        name = check_name(body.get("name") or "default", "name")
        bump = body.get("bump_version", True)
        if not isinstance(bump, bool):
            raise InvalidRequestError("bump_version must be true or false", field="bump_version")

        async def op() -> dict[str, Any]:
            def write():
                return self.store.create(run.id, "sampler_weights", name, base_model=self.engine.base_model,
                                         lora_rank=self.engine.lora_rank, write=self.engine.export_adapter)

            directory, ckpt = await self._call(run, write)
            if not bump:  # staged: a checkpoint to sample by path; the sampler keeps its version
                return {"version": run.policy_version, "path": ckpt.path}
            version = run.policy_version + 1
            if self.sampler is not None:
                await self._notify_sampler(run, name, str(directory), version)
            run.policy_version = version
            return {"version": version, "path": ckpt.path}

        return op

    async def _notify_sampler(self, run: Run, name: str, path: str, version: int) -> None:
        assert self.sampler is not None
        # Through the SDK's own wire client: its retries, its errors, and redirects followed (Modal
        # answers a request that runs past 150 s with a 303).
        wire = WireClient(self.sampler, timeout=600.0, ready_timeout=600.0)
        try:
            await wire.request("POST", "/v1/load_lora_adapter", what=f"publishing version {version} to the sampler",
                               json={"lora_name": name, "lora_path": path, "policy_version": version,
                                     "run_id": run.id, "default_run": run.id == self.run_id})
        finally:
            await wire.aclose()

    def _load(self, with_optimizer: bool):
        def prepare(run: Run, body: dict[str, Any], headers: Headers):
            try:
                directory = self.store.resolve(body.get("path") or "", kind="weights")
            except NotFoundError as exc:
                if _published(headers):  # it retries a 404 at submit as a cold start: a 400 stops it at once
                    raise InvalidRequestError(str(exc), field="path") from None
                raise

            async def op() -> dict[str, Any]:
                def load() -> int:
                    self.engine.load_state(directory, with_optimizer=with_optimizer)
                    run.step = self.engine.step
                    return run.step

                return {"step": await self._call(run, load), "path": body.get("path")}

            return op

        return prepare

    # ---- reads ------------------------------------------------------------------------------
    async def _poll(self, request: Request) -> Response:
        op_id = unquote(request.path_params["op_id"])
        queue = self._ops.get(op_id)
        op = queue.get(op_id) if queue is not None else None
        if op is None or queue is None:
            self._ops.pop(op_id, None)
            return error_response(404, f"unknown operation {request.path_params['op_id']!r}")
        try:
            hold = min(float(request.query_params.get("timeout", self.poll_hold)), self.poll_hold)
        except ValueError:
            hold = self.poll_hold
        if not await queue.wait(op, hold):
            return error_response(408, "operation still running; poll again",
                                  headers={"Retry-After": "0"})
        return JSONResponse(op.payload(), status_code=op.http_status)

    async def _health(self, request: Request) -> Response:
        if self.shutting_down:
            return error_response(503, "the trainer is shutting down")
        return JSONResponse({"status": "ok", "base_model": self.engine.base_model, "run_id": self.run_id,
                             "runs": len(self.runs), "queue_depth": sum(r.depth for r in self.runs.values())})

    @guarded
    async def _policy_version(self, request: Request) -> Response:
        return JSONResponse({"policy_version": self._run_of(request).policy_version})

    @guarded
    async def _get_info(self, request: Request) -> Response:
        e = self.engine
        body = await json_body(request) if request.method == "POST" else {}
        run = self._run_of(request, body)
        return JSONResponse({
            "model_data": {"arch": e.arch, "model_name": e.base_model, "tokenizer_id": e.tokenizer_id},
            "model_name": e.base_model, "is_lora": True, "lora_rank": run.lora_rank, "max_seq_len": e.max_seq_len,
            "vocab_size": e.vocab_size, "run_id": run.id, "step": run.step, "policy_version": run.policy_version})

    @guarded
    async def _checkpoints(self, request: Request) -> Response:
        run_id = request.headers.get("x-run-id") or request.query_params.get("run_id") or self.run_id
        # A closed run's checkpoints stay listed: they outlive it on disk.
        return JSONResponse({"checkpoints": [c.model_dump(mode="json") for c in self.store.list(run_id)]})

    @guarded
    async def _checkpoint_files(self, request: Request) -> Response:
        q = request.query_params
        try:
            page_size, page_token = int(q.get("page_size", 1000)), int(q.get("page_token", 0))
        except ValueError:
            raise InvalidRequestError("page_size and page_token must be integers", field="page_size") from None
        files = self.store.files(q.get("checkpoint_id", ""), page_size, page_token)
        return JSONResponse(files.model_dump(mode="json"))

    def close(self) -> None:
        self.shutting_down = True
        for run in self.runs.values():
            run.close()
        self._worker.shutdown(wait=False, cancel_futures=True)


def _accepted(op_id: str) -> JSONResponse:
    return JSONResponse({"operation_id": op_id, "schema_version": 1}, status_code=202,
                        headers={"Location": f"/operations/{op_id}"})


class ServerBusyError(Exception):
    """A run cannot be created now (the resident-run cap, a one-run engine, shutdown): a 503."""


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INDEX_PRUNE = 10_000


def _published(headers: Headers) -> bool:
    """Whether the request comes from the published baseten-loops client (loops' own sends ``loops/``)."""
    return headers.get("user-agent", "").startswith("baseten-loops/")


def _per_datum_means(out: ForwardBackwardOutput, n: int) -> dict[str, Any]:
    """The published baseten-loops client's convention: it averages the answers of the chunks it
    splits a batch into, weighted by datums, so it is sent the loss as a mean over this request's
    datums, and only that (``skip_token_normalization`` echoed)."""
    loss = out.metrics.get("loss:sum", out.loss) / max(n, 1)
    metrics = {"loss": loss, **{k: v for k, v in out.metrics.items() if k == "skip_token_normalization"}}
    return {**out.model_dump(mode="json"), "loss": loss, "metrics": metrics}


def _rank_and_seed(body: dict[str, Any], default_seed: int | None) -> tuple[int, int | None]:
    rank = body.get("lora_rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InvalidRequestError(f"lora_rank must be a positive integer, got {rank!r}", field="lora_rank")
    seed = body.get("seed", default_seed)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequestError("seed must be an integer or null", field="seed")
    return rank, seed
