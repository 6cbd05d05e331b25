"""What a backend is: something that says *where* a trainer and a sampler are (and runs them, when
they are its own). Backends never subclass the clients; every backend's servers speak the same
protocol, driven by the one client in ``loops_core``.

A backend is a subclass of ``Backend`` registered under a name (see ``loops_core.hookspecs``). The
``ServiceClient`` builds one per session with a ``BackendConfig`` and calls the async methods below
from the SDK's event loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pathlib import Path

from .errors import APIStatusError, InvalidRequestError, NotFoundError
from .types import Checkpoint, CheckpointDownload, CheckpointFile, CheckpointFilesResponse, ServerCapabilities
from .wire import Endpoint

# Capabilities a backend may declare; the contract suite skips what a backend does not declare.
CAPABILITIES = {
    "checkpoints",          # save_state / load_state / list_checkpoints / archive URLs
    "checkpoint_delete",    # ServiceClient.delete_checkpoint
    "sampler_pinning",      # a pinned SamplingClient keeps its exact version after newer publications
    "standalone_sampler",   # ServiceClient.create_sampling_client provisions a base-model sampler
    "deterministic",        # the same seeds give the same bits
    "tokenizer",            # get_tokenizer works offline
}


@dataclass
class BackendConfig:
    """What the ServiceClient was given (explicit arguments already merged with env vars)."""

    training_project_id: str | None = None
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    reuse_from_session_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerHandle:
    """A provisioned trainer and its paired sampler."""

    trainer: Endpoint
    sampler: Endpoint | None
    run_id: str
    base_model: str
    sampler_id: str | None = None
    max_seq_len: int | None = None


@dataclass
class SamplerHandle:
    sampler: Endpoint
    base_model: str
    sampler_id: str | None = None
    checkpoint_path: str | None = None


class Backend(abc.ABC):
    name: ClassVar[str] = "?"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: BackendConfig):
        self.config = config

    @abc.abstractmethod
    async def start_session(self) -> str:
        """Create the session; return its id."""

    @abc.abstractmethod
    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        """Provision (or reuse) a trainer and its paired sampler, healthy, and say where they are."""

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        raise NotImplementedError(f"the {self.name!r} backend cannot provision standalone samplers")

    async def get_server_capabilities(self) -> ServerCapabilities:
        return ServerCapabilities(supported_models=[])

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        raise NotImplementedError(f"the {self.name!r} backend does not list checkpoints")

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        raise NotImplementedError(f"the {self.name!r} backend does not serve checkpoint files")

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        raise NotImplementedError(f"the {self.name!r} backend does not delete checkpoints")

    async def list_checkpoint_files(self, checkpoint_id: str, page_size: int = 1000) -> list[CheckpointFile]:
        """Every file of a checkpoint: all pages of ``get_checkpoint_archive_url``."""
        files: list[CheckpointFile] = []
        token: int | None = 0
        while token is not None:
            page = await self.get_checkpoint_archive_url(checkpoint_id, page_size, token)
            files += page.presigned_urls
            if page.next_page_token is not None and page.next_page_token <= token:
                raise APIStatusError(f"checkpoint {checkpoint_id!r}: the file listing's page token does not advance",
                                     status_code=200)
            token = page.next_page_token
        return files

    async def download_checkpoint(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        """Download every file of a checkpoint into ``dest_dir`` (new or empty)."""
        from .download import download_files

        files = await self.list_checkpoint_files(checkpoint_id)
        if not files:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} has no files", status_code=404)
        return await download_files(files, dest_dir)

    async def release_trainer(self, run_id: str) -> None:
        """The TrainingClient for ``run_id`` was closed: stop what keeps its trainer busy (e.g. a
        heartbeat). The trainer itself lives until the session closes, so sampling clients made
        from it keep working."""

    def load_tokenizer(self, tokenizer_id: str) -> Any:
        """The tokenizer for ``tokenizer_id`` (default: the shared resolver)."""
        from .tokenizers import load_tokenizer

        return load_tokenizer(tokenizer_id)

    async def aclose(self) -> None:
        """Release everything this backend started (idempotent)."""


class LocalCheckpoints:
    """Checkpoint listing and ``file://`` URLs from the ``LOOPS_HOME`` store (fake and local)."""

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        from .checkpoints import CheckpointStore

        return CheckpointStore().list(run_id)

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        from .checkpoints import CheckpointStore

        return CheckpointStore().files(checkpoint_id, page_size, page_token)

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        from .checkpoints import CheckpointStore

        CheckpointStore().delete(checkpoint_id)


def check_rank(rank: Any) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InvalidRequestError(f"rank must be a positive integer, got {rank!r}", field="rank")
    return rank
