"""The trainer server: the Loops trainer protocol around a ``TrainerEngine``.

Routes (every submit answers 202 ``{operation_id, schema_version: 1}``; results come from
``GET /operations/{id}``)::

    POST /init_trainer_server         {lora_rank, seed?}             -> {step, lora_rank}
    POST /forward_backward, /forward  {data, loss_fn, loss_fn_config} -> ForwardBackwardOutput
    POST /optim_step                  {adam_params}                  -> {metrics}
    POST /save_state                  {name, ttl_seconds?}           -> {mode, path}
    POST /save_weights_for_sampler    {name, bump_version?}          -> {version, path}
    POST /load_state[_with_optimizer] {path}                         -> {step, path}
    GET  /operations/{id}             long-poll: 200 done|error, 408 re-poll, 404 unknown
    GET  /health  /policy_version  /get_info  /checkpoints

Requests are validated before they are queued, so bad input is a 400 at submit time and never
reaches the engine: state stays as it was. Every field the published client sends (``model``,
``seq_id``, ``run_id``, ``base_model``, ...) is accepted; unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..checkpoints import CheckpointStore, check_name
from ..engine import TrainerEngine
from ..errors import InvalidRequestError
from ..losses import validate_batch
from ..types import AdamParams, Datum
from .stats import stats_route
from .incarnation import IncarnationMiddleware
from .http import ApiKeyMiddleware, error_response, guarded, json_body, pydantic_message
from .operations import OperationQueue


@dataclass
class SamplerLink:
    """Where the trainer publishes adapters: the paired sampler's base URL (+ transport in-process)."""

    url: str
    headers: dict[str, str] | None = None
    transport: httpx.AsyncBaseTransport | None = None


class TrainerServer:
    def __init__(self, engine: TrainerEngine, *, run_id: str, store: CheckpointStore | None = None,
                 sampler: SamplerLink | None = None, seed: int | None = None, api_key: str | None = None,
                 poll_hold: float = 30.0, result_ttl: float = 3600.0):
        self.engine = engine
        self.run_id = run_id
        self.store = store or CheckpointStore()
        self.sampler = sampler
        self.seed = seed
        self.poll_hold = poll_hold
        self.queue = OperationQueue(ttl=result_ttl)
        self.policy_version = 0
        self.shutting_down = False
        # One worker thread: the engine sees one call at a time, in order, and needs no locks.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loops-trainer")
        routes = [
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
        self.app = IncarnationMiddleware(ApiKeyMiddleware(Starlette(routes=routes), api_key))

    # ---- plumbing -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: fn(*args, **kw))

    def _submit_route(self, name: str, prepare: Callable[[dict[str, Any]], Any]):
        """A POST route: validate with ``prepare(body)`` (which returns the op coroutine fn), queue it."""

        @guarded
        async def route(request: Request) -> Response:
            if self.shutting_down:
                return error_response(503, "the trainer is shutting down; retry on another replica")
            body = await json_body(request)
            key = request.headers.get("idempotency-key") or None
            if key and (known := self.queue.get(key)) is not None:
                return _accepted(known.id)
            seq_id = body.get("seq_id")
            if seq_id is not None and not isinstance(seq_id, int):
                raise InvalidRequestError("seq_id must be an integer", field="seq_id")
            try:
                fn = prepare(body)
            except Exception:
                self.queue.refuse(seq_id)  # its turn is over: the next one need not wait for it
                raise
            op, _ = self.queue.submit(name, fn, key=key, seq_id=seq_id)
            return _accepted(op.id)

        return route

    # ---- operations: each ``prepare`` validates now and returns what runs later -------------
    def _init(self, body: dict[str, Any]):
        rank = body.get("lora_rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InvalidRequestError(f"lora_rank must be a positive integer, got {rank!r}", field="lora_rank")
        seed = body.get("seed", self.seed)
        if seed is not None and not isinstance(seed, int):
            raise InvalidRequestError("seed must be an integer or null", field="seed")

        async def run() -> dict[str, Any]:
            await self._call(self.engine.init_lora, rank, seed)
            return {"step": 0, "lora_rank": rank}

        return run

    def _fb(self, backward: bool):
        def prepare(body: dict[str, Any]):
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
            config = validate_batch(data, loss_fn, body.get("loss_fn_config"), vocab_size=self.engine.vocab_size,
                                    max_seq_len=self.engine.max_seq_len)

            async def run() -> dict[str, Any]:
                out = await self._call(self.engine.forward_backward, data, loss_fn, config, backward=backward)
                return out.model_dump(mode="json")

            return run

        return prepare

    def _optim(self, body: dict[str, Any]):
        raw = body.get("adam_params")
        if raw is None:
            raise InvalidRequestError("adam_params is required", field="adam_params")
        try:
            params = AdamParams.model_validate(raw)
        except ValidationError as exc:
            msg, fld = pydantic_message(exc, "adam_params.")
            raise InvalidRequestError(msg, field=fld) from None

        async def run() -> dict[str, Any]:
            return {"metrics": await self._call(self.engine.optim_step, params)}

        return run

    def _save_state(self, body: dict[str, Any]):
        name = check_name(body.get("name") or "", "name")

        async def run() -> dict[str, Any]:
            def write() -> str:
                _, ckpt = self.store.create(self.run_id, "weights", name, base_model=self.engine.base_model,
                                            lora_rank=self.engine.lora_rank, write=self.engine.save_state)
                return ckpt.path or ""

            return {"mode": "full", "path": await self._call(write)}

        return run

    def _publish(self, body: dict[str, Any]):
        name = check_name(body.get("name") or "default", "name")

        async def run() -> dict[str, Any]:
            def write():
                return self.store.create(self.run_id, "sampler_weights", name, base_model=self.engine.base_model,
                                         lora_rank=self.engine.lora_rank, write=self.engine.export_adapter)

            directory, ckpt = await self._call(write)
            version = self.policy_version + 1
            if self.sampler is not None:
                await self._notify_sampler(name, str(directory), version)
            self.policy_version = version
            return {"version": version, "path": ckpt.path}

        return run

    async def _notify_sampler(self, name: str, path: str, version: int) -> None:
        assert self.sampler is not None
        async with httpx.AsyncClient(base_url=self.sampler.url, headers=self.sampler.headers or {},
                                     transport=self.sampler.transport, timeout=600.0) as client:
            r = await client.post("/v1/load_lora_adapter",
                                  json={"lora_name": name, "lora_path": path, "policy_version": version})
        if r.status_code >= 400:
            raise RuntimeError(f"the paired sampler refused adapter version {version}: {r.status_code} {r.text}")

    def _load(self, with_optimizer: bool):
        def prepare(body: dict[str, Any]):
            directory = self.store.resolve(body.get("path") or "", kind="weights")

            async def run() -> dict[str, Any]:
                await self._call(self.engine.load_state, directory, with_optimizer=with_optimizer)
                return {"step": self.engine.step, "path": body.get("path")}

            return run

        return prepare

    # ---- reads ------------------------------------------------------------------------------
    async def _poll(self, request: Request) -> Response:
        op = self.queue.get(unquote(request.path_params["op_id"]))
        if op is None:
            return error_response(404, f"unknown operation {request.path_params['op_id']!r}")
        try:
            hold = min(float(request.query_params.get("timeout", self.poll_hold)), self.poll_hold)
        except ValueError:
            hold = self.poll_hold
        if not await self.queue.wait(op, hold):
            if self.shutting_down:
                return error_response(503, "the trainer is shutting down")
            return error_response(408, "operation still running; poll again",
                                  headers={"Retry-After": "0"})
        return JSONResponse(op.payload())

    async def _health(self, request: Request) -> Response:
        if self.shutting_down:
            return error_response(503, "the trainer is shutting down")
        return JSONResponse({"status": "ok", "base_model": self.engine.base_model, "run_id": self.run_id,
                             "queue_depth": self.queue.depth})

    async def _policy_version(self, request: Request) -> Response:
        return JSONResponse({"policy_version": self.policy_version})

    async def _get_info(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({
            "model_data": {"arch": e.arch, "model_name": e.base_model, "tokenizer_id": e.tokenizer_id},
            "model_name": e.base_model, "is_lora": True, "lora_rank": e.lora_rank, "max_seq_len": e.max_seq_len,
            "vocab_size": e.vocab_size, "run_id": self.run_id, "step": e.step, "policy_version": self.policy_version})

    async def _checkpoints(self, request: Request) -> Response:
        return JSONResponse({"checkpoints": [c.model_dump(mode="json") for c in self.store.list(self.run_id)]})

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
        self.queue.close()
        self._worker.shutdown(wait=False, cancel_futures=True)


def _accepted(op_id: str) -> JSONResponse:
    return JSONResponse({"operation_id": op_id, "schema_version": 1}, status_code=202,
                        headers={"Location": f"/operations/{op_id}"})
