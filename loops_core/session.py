"""What the clients of one ``ServiceClient`` share: the backend, whether the session is closed, and
the session-level reads (checkpoints, tokenizers) written once for every client that offers them.

A ``TrainingClient`` gets this narrow context, not the ``ServiceClient`` itself, so the two client
modules do not depend on each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backend import Backend
from .errors import ClientClosedError, InvalidRequestError
from .types import Checkpoint, CheckpointDownload, CheckpointFilesResponse


def _require_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} must be a non-empty string, got {value!r}", field=name)
    return value


class Session:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.closed = False

    def check_open(self, what: str) -> None:
        if self.closed:
            raise ClientClosedError(f"{what}: the ServiceClient of this client was closed; create a new one")

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        self.check_open("list_checkpoints")
        return await self.backend.list_checkpoints(_require_id(run_id, "run_id"))

    async def checkpoint_archive_url(self, checkpoint_id: str, page_size: int,
                                     page_token: int) -> CheckpointFilesResponse:
        self.check_open("get_checkpoint_archive_url")
        return await self.backend.get_checkpoint_archive_url(_require_id(checkpoint_id, "checkpoint_id"),
                                                             page_size, page_token)

    async def download_checkpoint(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        self.check_open("download_checkpoint")
        return await self.backend.download_checkpoint(_require_id(checkpoint_id, "checkpoint_id"), dest_dir)

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        self.check_open("delete_checkpoint")
        try:
            await self.backend.delete_checkpoint(_require_id(checkpoint_id, "checkpoint_id"))
        except NotImplementedError as exc:
            raise InvalidRequestError(str(exc), field="checkpoint_id") from None

    def load_tokenizer(self, tokenizer_id: str) -> Any:
        return self.backend.load_tokenizer(tokenizer_id)

    async def release_trainer(self, run_id: str) -> None:
        if not self.closed:
            await self.backend.release_trainer(run_id)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self.backend.aclose()
