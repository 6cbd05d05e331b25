"""What the Tinker routes do, in terms of loops' own public clients.

One ``loops_core.ServiceClient`` (any backend) serves every Tinker session. Each Tinker model
(``create_model``, or ``load_weights`` with a session) is its own loops ``TrainingClient``: its own
run, adapter and optimizer. Its id is ``<session_id>:train:<model_seq_id>``, the id the SDK derives
itself when it creates a model from a checkpoint. Each sampling session is a loops
``SamplingClient``. Checkpoint paths are ``tinker://<model_id>/<weights|sampler_weights>/<name>``
on the wire and ``loops://<run_id>/...`` inside; the model → run index is kept under ``LOOPS_HOME``,
so saved paths outlive the server, and a ``tinker://`` path whose first part is no model id is taken
as a loops run id (checkpoints that loops scripts saved).
Submissions to one model are made one at a time, in arrival order (the SDK sends them in its
``seq_id`` order and waits for each answer before sending the next).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from ..checkpoints import loops_home, parse_uri
from ..errors import InvalidRequestError, NotFoundError
from ..sampling_client import SamplingClient
from ..service_client import ServiceClient
from ..training_client import TrainingClient
from ..types import AdamParams, Checkpoint
from . import convert
from .futures import FutureStore, Proto

KIND_OF_TYPE = {"training": "weights", "sampler": "sampler_weights"}


class RunIndex:
    """Which loops run each Tinker model id is, kept in ``$LOOPS_HOME/tinker_api/runs.jsonl`` so the
    ``tinker://<model_id>/...`` paths a script saved still resolve after the server restarts."""

    def __init__(self) -> None:
        self.file = loops_home() / "tinker_api" / "runs.jsonl"
        self.runs: dict[str, str] = {}  # model id -> loops run id
        self.models: dict[str, str] = {}  # loops run id -> model id
        if self.file.exists():
            for line in self.file.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    self.runs[entry["model_id"]], self.models[entry["run_id"]] = entry["run_id"], entry["model_id"]

    def add(self, model_id: str, run_id: str) -> None:
        self.runs[model_id], self.models[run_id] = run_id, model_id
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with self.file.open("a") as f:
            f.write(json.dumps({"model_id": model_id, "run_id": run_id}) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Session:
    session_id: str
    user_metadata: dict[str, Any] | None
    created_at: str = field(default_factory=_now)
    finished: bool = False
    model_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)


@dataclass
class Model:
    model_id: str
    base_model: str
    rank: int
    client: TrainingClient
    user_metadata: dict[str, Any] | None
    created_at: str = field(default_factory=_now)
    last_request_at: str = field(default_factory=_now)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def run_id(self) -> str:
        return self.client.run_id or self.model_id


@dataclass
class Sampler:
    sampler_id: str
    base_model: str
    model_path: str | None
    client: SamplingClient
    clones: int = 0


class TinkerService:
    def __init__(self, service: ServiceClient, *, base_model: str, any_base_model: bool):
        self.service = service
        self.base_model = base_model
        self.any_base_model = any_base_model  # the fake engine makes a model of any name
        self.futures = FutureStore()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self.run_index = RunIndex()
        self._creating: dict[str, str] = {}  # model_id -> request_id of its pending creation
        self._sampler_creations: dict[str, asyncio.Task] = {}

    # ---- sessions --------------------------------------------------------------------------------
    def create_session(self, body: dict[str, Any]) -> str:
        session_id = f"s-{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = Session(session_id, body.get("user_metadata"))
        return session_id

    def session(self, session_id: Any) -> Session:
        if not isinstance(session_id, str) or session_id not in self.sessions:
            raise NotFoundError(f"no session {session_id!r} on this server", status_code=404)
        return self.sessions[session_id]

    # ---- models ----------------------------------------------------------------------------------
    def model(self, model_id: Any) -> Model:
        if not isinstance(model_id, str) or model_id not in self.models:
            raise NotFoundError(f"no model {model_id!r} on this server (create it with create_model)",
                                status_code=404)
        return self.models[model_id]

    def _use(self, model_id: Any) -> Model:
        """The model a training request is for; its last request time moves."""
        m = self.model(model_id)
        m.last_request_at = _now()
        return m

    def _check_base_model(self, base_model: Any) -> str:
        if not isinstance(base_model, str) or not base_model:
            raise InvalidRequestError("base_model must be a model name", field="base_model")
        if base_model != self.base_model and not self.any_base_model:
            raise InvalidRequestError(f"this server trains {self.base_model!r}, not {base_model!r} "
                                      "(start it with --model to serve another)", field="base_model")
        return base_model

    def create_model(self, body: dict[str, Any]) -> str:
        session = self.session(body.get("session_id"))
        base_model = self._check_base_model(body.get("base_model"))
        lora = body.get("lora_config") or {}
        for part in ("train_mlp", "train_attn"):
            if lora.get(part) is False:
                raise InvalidRequestError(f"lora_config.{part}=False is not supported: loops adapts attention and "
                                          "MLP together", field=f"lora_config.{part}")
        _check_optimizer(body.get("optimizer_config"))
        rank, seed = lora.get("rank", 32), lora.get("seed")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InvalidRequestError(f"lora_config.rank must be a positive integer, got {rank!r}",
                                      field="lora_config.rank")
        model_id = self._new_model_id(session, body.get("model_seq_id"))
        if model_id in self._creating:  # the SDK retried its POST
            return self._creating[model_id]

        async def work() -> dict[str, Any]:
            client = await self.service.create_lora_training_client_async(base_model, rank=rank, seed=seed)
            self._add_model(session, Model(model_id, base_model, rank, client, body.get("user_metadata")))
            return {"model_id": model_id, "type": "create_model"}

        self._creating[model_id] = self.futures.submit("create_model", work())
        return self._creating[model_id]

    def _new_model_id(self, session: Session, seq: Any) -> str:
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidRequestError(f"model_seq_id must be a non-negative integer, got {seq!r}",
                                      field="model_seq_id")
        return f"{session.session_id}:train:{seq}"

    def _add_model(self, session: Session, model: Model) -> None:
        self.models[model.model_id] = model
        self.run_index.add(model.model_id, model.run_id)
        session.model_ids.append(model.model_id)

    def get_info(self, model_id: Any) -> dict[str, Any]:
        m = self.model(model_id)
        info = m.client.get_info()
        return {"type": "get_info", "model_id": m.model_id, "model_name": m.base_model, "is_lora": True,
                "lora_rank": m.rank, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": info.model_data.arch, "model_name": m.base_model,
                               "tokenizer_id": info.model_data.tokenizer_id or m.base_model}}

    # ---- training --------------------------------------------------------------------------------
    async def _in_order(self, m: Model, kind: str, start: Awaitable[Any], finish: Callable[[Any], Any]) -> str:
        """Submit to the model's loops client (one submission at a time, in arrival order); the
        Tinker future resolves to ``finish`` of the loops future's result."""
        async with m.lock:
            future = await start

        async def work() -> Any:
            return finish(await future)

        return self.futures.submit(kind, work())

    async def forward_backward(self, msg: Any) -> str:
        m = self._use(msg.model_id)
        data = await asyncio.to_thread(convert.datums, msg)  # big batches must not stall the event loop
        submit = m.client.forward_async if msg.forward_only else m.client.forward_backward_async
        return await self._in_order(
            m, "forward_backward", submit(data, msg.loss_fn or "cross_entropy", convert.loss_fn_config(msg)),
            lambda out: Proto(convert.forward_backward_output(out), json=out.model_dump(mode="json")))

    async def optim_step(self, body: dict[str, Any]) -> str:
        m = self._use(body.get("model_id"))
        if "optimizer_params" in body:
            raise InvalidRequestError("only Adam is supported: send adam_params", field="optimizer_params")
        params = AdamParams.model_validate(body.get("adam_params") or {})
        return await self._in_order(m, "optim_step", m.client.optim_step_async(params),
                                    lambda out: {"metrics": out.metrics or {}, "type": "optim_step"})

    async def save_weights(self, body: dict[str, Any]) -> str:
        m = self._use(body.get("model_id"))
        name = body.get("path") or f"state-{uuid.uuid4().hex[:8]}"
        return await self._in_order(m, "save_weights", m.client.save_state_async(name, body.get("ttl_seconds")),
                                    lambda out: {"path": self.tinker_path(out.path), "type": "save_weights"})

    async def save_weights_for_sampler(self, body: dict[str, Any]) -> str:
        m = self._use(body.get("model_id"))
        if body.get("kind", "snapshot") != "snapshot":
            raise InvalidRequestError(f"kind={body.get('kind')!r} is not supported: loops pins snapshots",
                                      field="kind")
        name = body.get("path")
        if name:
            return await self._in_order(
                m, "save_weights_for_sampler", m.client.save_weights_for_sampler_async(name, body.get("ttl_seconds")),
                lambda out: {"path": self.tinker_path(out.path), "type": "save_weights_for_sampler"})

        # No name: publish, and hand back a sampling session pinned to exactly these weights.
        seq = body.get("sampling_session_seq_id")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidRequestError("send a path (a checkpoint name) or a sampling_session_seq_id",
                                      field="sampling_session_seq_id")
        sampler_id = f"{m.model_id.split(':train:')[0]}:sample:{seq}"

        def pinned(client: SamplingClient) -> dict[str, Any]:
            self._add_sampler(Sampler(sampler_id, m.base_model, self.tinker_path(client.checkpoint_path), client))
            return {"path": None, "sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        publish = m.client.save_weights_and_get_sampling_client_async(name=f"sampler-{uuid.uuid4().hex[:10]}")
        return await self._in_order(m, "save_weights_for_sampler", publish, pinned)

    async def load_weights(self, body: dict[str, Any]) -> str:
        path = body.get("path")
        loops_path = self.loops_path(path)
        with_optimizer = bool(body.get("optimizer"))
        _check_optimizer(body.get("optimizer_config"))
        if body.get("model_id"):
            m = self._use(body.get("model_id"))
            load = m.client.load_state_with_optimizer_async if with_optimizer else m.client.load_state_async
            return await self._in_order(m, "load_weights", load(loops_path),
                                        lambda _: {"path": path, "model_id": m.model_id, "type": "load_weights"})

        # A new model from a checkpoint (ServiceClient.create_training_client_from_state*).
        session = self.session(body.get("session_id"))
        model_id = self._new_model_id(session, body.get("model_seq_id"))
        if model_id in self._creating:
            return self._creating[model_id]

        async def create() -> dict[str, Any]:
            ckpt = await self._checkpoint(path)
            base_model = body.get("base_model") or ckpt.base_model or self.base_model
            rank = ckpt.lora_adapter_config.r if ckpt.lora_adapter_config else 32
            client = await self.service.create_lora_training_client_async(self._check_base_model(base_model),
                                                                          rank=rank)
            load = client.load_state_with_optimizer_async if with_optimizer else client.load_state_async
            await (await load(loops_path))
            self._add_model(session, Model(model_id, base_model, rank, client, body.get("user_metadata")))
            return {"path": path, "model_id": model_id, "type": "load_weights"}

        self._creating[model_id] = self.futures.submit("load_weights", create())
        return self._creating[model_id]

    # ---- sampling --------------------------------------------------------------------------------
    async def create_sampling_session(self, body: dict[str, Any]) -> str:
        session = self.session(body.get("session_id"))
        seq = body.get("sampling_session_seq_id")
        sampler_id = f"{session.session_id}:sample:{seq}"
        if sampler_id in self.samplers:
            return sampler_id
        task = self._sampler_creations.get(sampler_id)
        if task is None:  # a retried POST waits for the same creation
            task = asyncio.ensure_future(self._open_sampler(sampler_id, body.get("model_path"), body.get("base_model")))
            self._sampler_creations[sampler_id] = task
        try:
            self._add_sampler(await asyncio.shield(task))
        finally:
            if task.done():
                self._sampler_creations.pop(sampler_id, None)
        return sampler_id

    async def _open_sampler(self, sampler_id: str, model_path: Any, base_model: Any) -> Sampler:
        if model_path:
            loops_path = self.loops_path(model_path)
            run_id, _, _ = parse_uri(loops_path) or ("", "", "")
            owner = next((m for m in self.models.values() if m.run_id == run_id), None)
            if owner is not None:  # the run's own sampler already serves its checkpoints
                client = await owner.client.create_sampling_client_async(loops_path)
                return Sampler(sampler_id, owner.base_model, model_path, client)
            ckpt = await self._checkpoint(model_path)
            client = await self.service.create_sampling_client_async(model_path=loops_path)
            return Sampler(sampler_id, ckpt.base_model or self.base_model, model_path, client)
        base_model = self._check_base_model(base_model)
        client = await self.service.create_sampling_client_async(base_model=base_model)
        return Sampler(sampler_id, base_model, None, client)

    def _add_sampler(self, sampler: Sampler) -> None:
        self.samplers[sampler.sampler_id] = sampler
        session = self.sessions.get(sampler.sampler_id.split(":sample:")[0])
        if session is not None and sampler.sampler_id not in session.sampler_ids:
            session.sampler_ids.append(sampler.sampler_id)

    def sampler(self, sampler_id: Any) -> Sampler:
        if not isinstance(sampler_id, str) or sampler_id not in self.samplers:
            raise NotFoundError(f"no sampling session {sampler_id!r} on this server", status_code=404)
        return self.samplers[sampler_id]

    def asample(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        if not body.get("sampling_session_id"):
            raise InvalidRequestError("sample through a sampling session (create_sampling_session first)",
                                      field="sampling_session_id")
        s = self.sampler(body["sampling_session_id"])
        prompt, n, params, include, topk = convert.sample_inputs(body)
        sequence_ids = [f"{s.sampler_id}:{body.get('seq_id')}:{i}" for i in range(n)]

        async def work() -> Proto:
            out = await s.client.sample_async(prompt, n, params, include, topk)
            return Proto(convert.sample_response(out, topk), json=out.model_dump(mode="json"))

        return self.futures.submit("sample", work()), sequence_ids

    # ---- checkpoints -----------------------------------------------------------------------------
    def loops_path(self, path: Any) -> str:
        """``tinker://<model_id|run_id>/<kind>/<name>`` → ``loops://<run_id>/<kind>/<name>``."""
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise InvalidRequestError(f"path must be a tinker:// checkpoint path, got {path!r}", field="path")
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights") or not parts[0] or not parts[2]:
            raise InvalidRequestError(f"{path!r} is not tinker://<run>/<weights|sampler_weights>/<name>",
                                      field="path")
        run_id = self.run_index.runs.get(parts[0], parts[0])
        return f"loops://{run_id}/{parts[1]}/{parts[2]}"

    def tinker_path(self, loops_path: str | None) -> str | None:
        parsed = parse_uri(loops_path) if loops_path else None
        if parsed is None:
            return loops_path
        run_id, kind, name = parsed
        return f"tinker://{self.run_index.models.get(run_id, run_id)}/{kind}/{name}"

    async def _checkpoint(self, tinker_path: Any) -> Checkpoint:
        run_id, kind, name = parse_uri(self.loops_path(tinker_path))  # type: ignore[misc]
        for ckpt in await self.service.list_checkpoints_async(run_id):
            if ckpt.checkpoint_id == name and KIND_OF_TYPE.get(ckpt.checkpoint_type) == kind:
                return ckpt
        raise NotFoundError(f"no checkpoint {tinker_path!r}", status_code=404)

    async def weights_info(self, tinker_path: Any) -> dict[str, Any]:
        ckpt = await self._checkpoint(tinker_path)
        return {"base_model": ckpt.base_model or self.base_model, "is_lora": True,
                "lora_rank": ckpt.lora_adapter_config.r if ckpt.lora_adapter_config else None,
                "optimizer_config": {"type": "adamw"}, "train_unembed": False, "train_mlp": True, "train_attn": True}

    async def checkpoints(self, model_id: str) -> list[dict[str, Any]]:
        m = self.model(model_id)
        out = []
        for ckpt in await self.service.list_checkpoints_async(m.run_id):
            kind = KIND_OF_TYPE.get(ckpt.checkpoint_type, ckpt.checkpoint_type)
            out.append({"checkpoint_id": f"{kind}/{ckpt.checkpoint_id}", "checkpoint_type": ckpt.checkpoint_type,
                        "time": ckpt.created_at, "tinker_path": f"tinker://{m.model_id}/{kind}/{ckpt.checkpoint_id}",
                        "size_bytes": ckpt.size_bytes, "public": False})
        return sorted(out, key=lambda c: c["time"])

    async def training_run(self, model_id: str) -> dict[str, Any]:
        m = self.model(model_id)
        ckpts = await self.checkpoints(model_id)
        last = {t: next((c for c in reversed(ckpts) if c["checkpoint_type"] == t), None)
                for t in ("training", "sampler")}
        return {"training_run_id": m.model_id, "base_model": m.base_model, "model_owner": "loops", "is_lora": True,
                "corrupted": False, "lora_rank": m.rank, "last_request_time": m.last_request_at,
                "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
                "user_metadata": m.user_metadata}

    async def close(self) -> None:
        await self.service.aclose()


def _check_optimizer(config: Any) -> None:
    if config and config.get("type", "adamw") != "adamw":
        raise InvalidRequestError(f"optimizer {config.get('type')!r} is not supported: loops trains with AdamW",
                                  field="optimizer_config")
