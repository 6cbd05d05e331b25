"""Tinker's ``RestClient``: runs and checkpoints, in Tinker's shapes, from loops' records.

Runs come from the backend's checkpoint listing plus the shim's run record (``_runs``: base model,
rank, ``user_metadata``). Deleting a checkpoint works where checkpoints are local directories
(fake, local backends); elsewhere it raises ``BadRequestError``. ``get_external_weights_urls``
returns the backend's file URLs for a checkpoint (``file://`` on fake and local).
"""

from __future__ import annotations

from typing import Any, Literal

import loops_core
from loops_core.backend import LocalCheckpoints
from loops_core.checkpoints import CheckpointStore, loops_home, parse_uri
from loops_core.errors import InvalidRequestError, NotFoundError

from ... import types
from ..._exceptions import tinker_errors
from ..._runs import RECORD, forget_checkpoint, read_run, to_tinker_checkpoint, training_run
from .api_future import APIFuture, deprecated_async, run

Scope = Literal["owned", "accessible"]


class RestClient:
    """REST-style reads (and checkpoint deletes). ``RestClient()`` opens its own loops session on the
    ``LOOPS_BACKEND`` backend; ``ServiceClient.create_rest_client()`` shares the service's."""

    def __init__(self, _holder: Any = None, *, base_url: str | None = None, api_key: str | None = None):
        self._holder = _holder  # a tinker ServiceClient, or None
        self._own: loops_core.ServiceClient | None = None

    def _service(self) -> loops_core.ServiceClient:
        if self._holder is not None:
            return self._holder.loops_client
        if self._own is None:
            with tinker_errors():
                self._own = loops_core.ServiceClient()
        return self._own

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        return run(APIFuture, self._service().get_server_capabilities_async())

    # ---- runs --------------------------------------------------------------------------------------
    def get_training_run(self, training_run_id: types.ModelID,
                         access_scope: Scope = "owned") -> APIFuture[types.TrainingRun]:
        """The run: base model, rank, last checkpoints and the ``user_metadata`` given at creation."""
        return run(APIFuture, self._run(self._service(), training_run_id))

    def get_training_run_by_tinker_path(self, tinker_path: str,
                                        access_scope: Scope = "owned") -> APIFuture[types.TrainingRun]:
        """The run a checkpoint path belongs to."""
        return run(APIFuture, self._run(self._service(), _parse(tinker_path)[0]))

    async def _run(self, service: loops_core.ServiceClient, run_id: str) -> types.TrainingRun:
        out = training_run(run_id, await _checkpoints(service, run_id))
        if out is None:
            raise NotFoundError(f"training run {run_id!r} not found", status_code=404)
        return out

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        service = self._service()

        async def go() -> types.WeightsInfoResponse:
            tr = await self._run(service, _parse(tinker_path)[0])
            record = read_run(tr.training_run_id) or {}
            return types.WeightsInfoResponse(base_model=tr.base_model, is_lora=True, lora_rank=tr.lora_rank,
                                             **{k: record.get(k) for k in ("train_unembed", "train_mlp", "train_attn")})

        return run(APIFuture, go())

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: Scope = "owned",
                           project_id: str | None = None) -> APIFuture[types.TrainingRunsResponse]:
        """Runs created through the shim on this machine (their records under ``$LOOPS_HOME/runs``)."""
        service = self._service()

        async def go() -> types.TrainingRunsResponse:
            records = sorted(loops_home().glob(f"runs/*/{RECORD}"), key=lambda p: p.stat().st_mtime, reverse=True)
            runs = [await self._run(service, p.parent.name) for p in records[offset:offset + limit]]
            return types.TrainingRunsResponse(training_runs=runs)

        return run(APIFuture, go())

    # ---- checkpoints -----------------------------------------------------------------------------------
    def list_checkpoints(self, training_run_id: types.ModelID) -> APIFuture[types.CheckpointsListResponse]:
        service = self._service()

        async def go() -> types.CheckpointsListResponse:
            record = read_run(training_run_id)
            found = await _checkpoints(service, training_run_id)
            return types.CheckpointsListResponse(checkpoints=[to_tinker_checkpoint(c, record) for c in found])

        return run(APIFuture, go())

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[types.ExternalWeightsUrlsResponse]:
        """``{relative file name: URL}`` for every file of a checkpoint."""
        service = self._service()

        async def go() -> types.ExternalWeightsUrlsResponse:
            run_id, kind, name = _parse(tinker_path)
            files = await service.get_checkpoint_archive_url_async(f"{run_id}/{kind}/{name}")
            return types.ExternalWeightsUrlsResponse(urls={f.relative_file_name: f.url for f in files.presigned_urls})

        return run(APIFuture, go())

    def delete_checkpoint(self, training_run_id: types.ModelID, checkpoint_id: str) -> APIFuture[None]:
        """Delete ``<weights|sampler_weights>/<name>`` of a run (fake and local backends)."""
        return run(APIFuture, self._delete(self._service(), training_run_id, checkpoint_id))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        service = self._service()

        async def go() -> None:
            run_id, kind, name = _parse(tinker_path)
            await self._delete(service, run_id, f"{kind}/{name}")

        return run(APIFuture, go())

    async def _delete(self, service: loops_core.ServiceClient, run_id: str, checkpoint_id: str) -> None:
        if not isinstance(service.backend, LocalCheckpoints):
            raise InvalidRequestError(f"deleting checkpoints is not supported on the {service.backend_name!r} "
                                      "backend", field="checkpoint_id")
        CheckpointStore().delete(f"{run_id}/{checkpoint_id}")  # NotFoundError when absent
        forget_checkpoint(run_id, checkpoint_id)

    get_training_run_async = deprecated_async(get_training_run, returns_future=False)
    get_training_run_by_tinker_path_async = deprecated_async(get_training_run_by_tinker_path, returns_future=False)
    list_training_runs_async = deprecated_async(list_training_runs, returns_future=False)
    list_checkpoints_async = deprecated_async(list_checkpoints, returns_future=False)
    get_external_weights_urls_async = deprecated_async(get_external_weights_urls, returns_future=False)
    delete_checkpoint_async = deprecated_async(delete_checkpoint, returns_future=False)
    delete_checkpoint_from_tinker_path_async = deprecated_async(delete_checkpoint_from_tinker_path,
                                                                returns_future=False)


async def _checkpoints(service: loops_core.ServiceClient, run_id: str) -> list[loops_core.Checkpoint]:
    try:
        return await service.list_checkpoints_async(run_id)
    except NotImplementedError:
        return []  # the backend keeps no listing: the run record alone describes the run


def _parse(path: str) -> tuple[str, str, str]:
    parsed = parse_uri(path) if isinstance(path, str) else None
    if parsed is None:
        raise InvalidRequestError(f"{path!r} is not a checkpoint path tinker://<run>/<weights|sampler_weights>/<name>",
                                  field="tinker_path")
    return parsed
