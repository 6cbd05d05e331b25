"""The backend behind ``ServiceClient.local``: servers that are already running somewhere.

It provisions nothing. Each training client gets a run of its own on the trainer (``POST /runs``):
its own adapter, optimizer, versions and checkpoints, so clients in many processes can share one
``loops serve``. Both endpoints carry the run in ``X-Run-Id``, so the sampler serves the run's
versions. A trainer that predates runs (no ``/runs``) is used as before: its one run for everyone.
Checkpoints are listed by the trainer itself (``/checkpoints``), so this works for any loops trainer
server, local or remote.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace

from .backend import Backend, BackendConfig, SamplerHandle, TrainerHandle
from .errors import InvalidRequestError, NotFoundError
from .types import Checkpoint, CheckpointFilesResponse
from .wire import Endpoint, WireClient


class DirectBackend(Backend):
    name = "direct"
    capabilities = frozenset({"checkpoints", "sampler_pinning", "tokenizer"})

    def __init__(self, config: BackendConfig, *, trainer_url: str, sampler_url: str):
        super().__init__(config)
        self.trainer = Endpoint(url=trainer_url.rstrip("/"), api_key=config.api_key)
        self.sampler = Endpoint(url=sampler_url.rstrip("/"), api_key=config.api_key)
        self._wire = WireClient(self.trainer, timeout=60.0, ready_timeout=60.0)

    async def start_session(self) -> str:
        return "local"

    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        return await create_run(self._wire, self.trainer, self.sampler, base_model, rank=rank, seed=seed)

    async def release_trainer(self, run_id: str) -> None:
        await close_run(self._wire, run_id)

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        return SamplerHandle(sampler=self.sampler, base_model=base_model or "", checkpoint_path=model_path)

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        data = await self._wire.get_json("/checkpoints", what="list checkpoints", params={"run_id": run_id})
        return [c for c in map(Checkpoint.model_validate, data.get("checkpoints", [])) if c.run_id == run_id]

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        data = await self._wire.get_json("/checkpoint_files", what="checkpoint files", params={
            "checkpoint_id": checkpoint_id, "page_size": page_size, "page_token": page_token})
        return CheckpointFilesResponse.model_validate(data)

    async def aclose(self) -> None:
        await self._wire.aclose()


def with_run(endpoint: Endpoint, run_id: str) -> Endpoint:
    """``endpoint``, naming ``run_id`` on every request (trainer reads and sampler pins use it)."""
    return replace(endpoint, headers={**endpoint.headers, "X-Run-Id": run_id})


async def create_run(wire: WireClient, trainer: Endpoint, sampler: Endpoint | None, base_model: str, *, rank: int,
                     seed: int | None, run_id: str | None = None) -> TrainerHandle:
    """A new run on a running trainer (a 400 if it serves another base model, a 503 at its run cap);
    ``run_id`` chooses its id (else the trainer does)."""
    body = {"base_model": base_model, "lora_rank": rank, "seed": seed, **({"run_id": run_id} if run_id else {})}
    try:
        r = await wire.request("POST", "/runs", what="create run", retry=False, json=body)
    except NotFoundError:  # a trainer from before runs: its one run
        info = await wire.get_json("/get_info", what="get_info")
        return TrainerHandle(trainer=trainer, sampler=sampler, base_model=base_model,
                             run_id=info.get("run_id") or f"local-{uuid.uuid4().hex[:8]}")
    run_id = r.json()["run_id"]
    return TrainerHandle(trainer=with_run(trainer, run_id), sampler=with_run(sampler, run_id) if sampler else None,
                         base_model=base_model, run_id=run_id)


async def close_run(wire: WireClient, run_id: str) -> None:
    """Free a run's adapter and optimizer on the trainer (its published versions stay servable)."""
    with contextlib.suppress(NotFoundError, InvalidRequestError):  # gone already, or a trainer without runs
        await wire.request("POST", "/close_run", what="close run", json={"run_id": run_id}, retry=False)
