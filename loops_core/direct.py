"""The backend behind ``ServiceClient.local``: servers that are already running somewhere.

It provisions nothing. Checkpoints are listed by the trainer itself (``/checkpoints``), so this
works for any loops trainer server, local or remote.
"""

from __future__ import annotations

import uuid

from .backend import Backend, BackendConfig, SamplerHandle, TrainerHandle
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
        info = await self._wire.get_json("/get_info", what="get_info")
        return TrainerHandle(trainer=self.trainer, sampler=self.sampler, base_model=base_model,
                             run_id=info.get("run_id") or f"local-{uuid.uuid4().hex[:8]}")

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        return SamplerHandle(sampler=self.sampler, base_model=base_model or "", checkpoint_path=model_path)

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        data = await self._wire.get_json("/checkpoints", what="list checkpoints")
        return [c for c in map(Checkpoint.model_validate, data.get("checkpoints", [])) if c.run_id == run_id]

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        data = await self._wire.get_json("/checkpoint_files", what="checkpoint files", params={
            "checkpoint_id": checkpoint_id, "page_size": page_size, "page_token": page_token})
        return CheckpointFilesResponse.model_validate(data)

    async def aclose(self) -> None:
        await self._wire.aclose()

