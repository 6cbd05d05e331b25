"""The fake backend: the real trainer and sampler server apps, in-process, around the numpy engine.

Nothing listens on a socket: clients reach the apps through httpx's ASGI transport, so the fake
exercises the same protocol code (queues, idempotency, long-polls, version pinning) as every other
backend, in milliseconds. ``loops serve --engine fake`` runs the same apps on loopback.

As on the local backend, the training clients of one ServiceClient on one base model share one
trainer + sampler pair, each with a run of its own.
"""

from __future__ import annotations

import uuid

import httpx

from loops_core.backend import Backend, LocalCheckpoints, SamplerHandle, TrainerHandle
from loops_core.checkpoints import CheckpointStore, read_meta
from loops_core.direct import with_run
from loops_core.errors import ServerShutdownError
from loops_core.server.sampler import SamplerServer
from loops_core.server.trainer import TrainerServer
from loops_core.types import ServerCapabilities, SupportedModel
from loops_core.wire import Endpoint

from loops_core.assembly import EngineConfig, in_process_pair

from .engine import FakeSamplerEngine


def fake_pair(base_model: str, *, rank: int = 32, seed: int | None = None, run_id: str | None = None,
              store: CheckpointStore | None = None, poll_hold: float = 30.0) -> tuple[TrainerServer, SamplerServer]:
    """A paired trainer and sampler server around fresh fake engines (the one assembly, in-process)."""
    return in_process_pair(EngineConfig(model=base_model, engine="fake", rank=rank, seed=seed),
                           run_id=run_id or f"fake-{uuid.uuid4().hex[:12]}", store=store or CheckpointStore(),
                           poll_hold=poll_hold)


def asgi_endpoint(app, name: str) -> Endpoint:  # noqa: ANN001
    return Endpoint(url=f"http://{name}", transport=httpx.ASGITransport(app=app))


class FakeBackend(LocalCheckpoints, Backend):
    name = "fake"
    capabilities = frozenset({"checkpoints", "checkpoint_delete", "sampler_pinning", "standalone_sampler",
                              "deterministic", "tokenizer"})

    def __init__(self, config):  # noqa: ANN001
        super().__init__(config)
        self.servers: list[TrainerServer | SamplerServer] = []
        self.pairs: dict[str, tuple[TrainerServer, SamplerServer]] = {}  # by base model
        self.run_owner: dict[str, TrainerServer] = {}

    async def start_session(self) -> str:
        return f"fake-session-{uuid.uuid4().hex[:12]}"

    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        if base_model not in self.pairs:
            self.pairs[base_model] = fake_pair(base_model, rank=rank, seed=seed)
            self.servers += self.pairs[base_model]
        trainer, sampler = self.pairs[base_model]
        from loops_core.server.trainer import ServerBusyError

        try:
            run = await trainer.create_run(rank, seed)
        except ServerBusyError as exc:
            raise ServerShutdownError(str(exc)) from None
        self.run_owner[run.id] = trainer
        return TrainerHandle(trainer=with_run(asgi_endpoint(trainer.app, "fake-trainer"), run.id),
                             sampler=with_run(asgi_endpoint(sampler.app, "fake-sampler"), run.id),
                             run_id=run.id, base_model=base_model, max_seq_len=trainer.engine.max_seq_len)

    async def release_trainer(self, run_id: str) -> None:
        trainer = self.run_owner.pop(run_id, None)
        if trainer is not None:
            await trainer.close_run(run_id)

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        store = CheckpointStore()
        if model_path is not None:
            base_model = read_meta(store.resolve(model_path, kind="sampler_weights")).get("base_model")
        sampler = SamplerServer(FakeSamplerEngine(base_model or "fake"), store=store)
        self.servers.append(sampler)
        return SamplerHandle(sampler=asgi_endpoint(sampler.app, "fake-sampler"), base_model=base_model or "fake",
                             sampler_id=f"fake-sampler-{uuid.uuid4().hex[:8]}", checkpoint_path=model_path)

    async def get_server_capabilities(self) -> ServerCapabilities:
        return ServerCapabilities(supported_models=[SupportedModel(model_name="any", max_context_length=4096,
                                                                   gpu_classes=["cpu"])])

    async def aclose(self) -> None:
        for s in self.servers:
            if isinstance(s, TrainerServer):
                s.close()
            else:
                s.shutting_down = True
        self.servers.clear()
        self.pairs.clear()
        self.run_owner.clear()
