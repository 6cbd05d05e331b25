"""Tinker's ``RestClient``: runs and checkpoints, in Tinker's shapes, from loops' records.

Runs come from the backend's checkpoint listing plus the shim's run record (``_runs``: base model,
rank, ``user_metadata``). Deleting a checkpoint needs a public delete in loops_core
(``ServiceClient.delete_checkpoint``); where there is none it raises ``BadRequestError``.
``get_external_weights_urls`` returns the backend's file URLs for a checkpoint (``file://`` on fake
and local; they do not expire). Tinker's account features (sessions, billing, audit log, projects,
publishing, TTLs) raise ``NotImplementedError`` naming the reason.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

import loops_core
from loops_core.checkpoints import loops_home, parse_uri
from loops_core.errors import InvalidRequestError, NotFoundError

from ... import _convert as convert
from ... import types
from ..._exceptions import tinker_errors
from ..._runs import RECORDS, forget_checkpoint, read_run, to_tinker_checkpoint, training_run
from .api_future import APIFuture, AwaitableConcurrentFuture, deprecated_async, run, unsupported  # noqa: F401

Scope = Literal["owned", "accessible"]


class RestClient:
    """REST-style reads (and checkpoint deletes). ``RestClient()`` opens its own loops session on the
    ``LOOPS_BACKEND`` backend; ``ServiceClient.create_rest_client()`` shares the service's."""

    def __init__(self, _holder: Any = None, *, base_url: str | None = None, api_key: str | None = None):
        self._holder = _holder  # a tinker ServiceClient, or None
        self._own: loops_core.ServiceClient | None = None

    def _service(self) -> loops_core.ServiceClient:
        if self._holder is not None:
            return self._holder.holder
        if self._own is None:
            with tinker_errors():
                self._own = loops_core.ServiceClient()
        return self._own

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        service = self._service()

        async def go() -> types.GetServerCapabilitiesResponse:
            return convert.from_loops_capabilities(await service.get_server_capabilities_async())

        return run(APIFuture, go())

    def get_telemetry(self) -> None:
        """loops sends no telemetry."""
        return None

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
            records = sorted((loops_home() / RECORDS).glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            runs = [await self._run(service, p.stem) for p in records[offset:offset + limit]]
            return types.TrainingRunsResponse(training_runs=runs, cursor=types.Cursor(
                limit=limit, offset=offset, total_count=len(records)))

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
            return types.ExternalWeightsUrlsResponse(urls={f.relative_file_name: f.url for f in files.presigned_urls},
                                                     expires=_NEVER)

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
        delete = getattr(service, "delete_checkpoint_async", None)  # not in loops_core's public API yet
        if delete is None:
            raise InvalidRequestError("deleting checkpoints needs loops_core.ServiceClient.delete_checkpoint, which "
                                      "this loops version does not have", field="checkpoint_id")
        await delete(f"{run_id}/{checkpoint_id}")  # NotFoundError when absent
        forget_checkpoint(run_id, checkpoint_id)

    # ---- Tinker account features loops does not have ----------------------------------------------
    def assign_session_project(self, session_id: str, project_id: str) -> Any:
        raise unsupported("RestClient.assign_session_project", "loops has no projects")

    def copy_weights(self, path: str, destination_project_id: str | None = None, *, ttl_seconds: int | None = None, weights_access_token: str | None = None) -> Any:
        raise unsupported("RestClient.copy_weights", "loops has no projects to copy checkpoints between")

    def export_session_trace(self, session_id: str) -> Any:
        raise unsupported("RestClient.export_session_trace", "loops keeps no session traces")

    def get_audit_log(self, event_type: str = "all", day: Any = None) -> Any:
        raise unsupported("RestClient.get_audit_log", "loops keeps no audit log (admin)")

    def get_billing_usage(self, starting_on: Any, ending_before: Any) -> Any:
        raise unsupported("RestClient.get_billing_usage", "loops does no billing")

    def get_current_checkpoint_storage_usage(self, project_id: str | None = None) -> Any:
        raise unsupported("RestClient.get_current_checkpoint_storage_usage", "loops does no billing or storage accounting")

    def get_sampler(self, sampler_id: str) -> Any:
        raise unsupported("RestClient.get_sampler", "loops samplers are not Tinker sampling sessions; use the SamplingClient")

    def get_session(self, session_id: str, access_scope: Scope = "owned") -> Any:
        raise unsupported("RestClient.get_session", "loops keeps no server-side session records")

    def list_sessions(self, limit: int = 20, offset: int = 0, access_scope: Scope = "owned") -> Any:
        raise unsupported("RestClient.list_sessions", "loops keeps no server-side session records")

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> Any:
        raise unsupported("RestClient.list_user_checkpoints", "loops lists checkpoints per run; use list_checkpoints(run_id)")

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> Any:
        raise unsupported("RestClient.publish_checkpoint_from_tinker_path", "loops has no public checkpoint sharing")

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> Any:
        raise unsupported("RestClient.unpublish_checkpoint_from_tinker_path", "loops has no public checkpoint sharing")

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> Any:
        raise unsupported("RestClient.set_checkpoint_ttl_from_tinker_path", "loops sets a checkpoint's TTL when it is saved (ttl_seconds), not after")

    def search_sessions(self, request: Any) -> Any:
        raise unsupported("RestClient.search_sessions", "loops keeps no server-side session records")

    def whoami(self) -> Any:
        raise unsupported("RestClient.whoami", "loops has no accounts")

    get_training_run_async = deprecated_async(get_training_run, returns_future=False)
    get_training_run_by_tinker_path_async = deprecated_async(get_training_run_by_tinker_path, returns_future=False)
    list_training_runs_async = deprecated_async(list_training_runs, returns_future=False)
    list_checkpoints_async = deprecated_async(list_checkpoints, returns_future=False)
    get_external_weights_urls_async = deprecated_async(get_external_weights_urls, returns_future=False)
    delete_checkpoint_async = deprecated_async(delete_checkpoint, returns_future=False)
    delete_checkpoint_from_tinker_path_async = deprecated_async(delete_checkpoint_from_tinker_path,
                                                                returns_future=False)
    assign_session_project_async = deprecated_async(assign_session_project, returns_future=False)
    copy_weights_async = deprecated_async(copy_weights, returns_future=False)
    export_session_trace_async = deprecated_async(export_session_trace, returns_future=False)
    get_audit_log_async = deprecated_async(get_audit_log, returns_future=False)
    get_billing_usage_async = deprecated_async(get_billing_usage, returns_future=False)
    get_current_checkpoint_storage_usage_async = deprecated_async(get_current_checkpoint_storage_usage, returns_future=False)
    get_sampler_async = deprecated_async(get_sampler, returns_future=False)
    get_session_async = deprecated_async(get_session, returns_future=False)
    list_sessions_async = deprecated_async(list_sessions, returns_future=False)
    publish_checkpoint_from_tinker_path_async = deprecated_async(publish_checkpoint_from_tinker_path, returns_future=False)
    unpublish_checkpoint_from_tinker_path_async = deprecated_async(unpublish_checkpoint_from_tinker_path, returns_future=False)
    set_checkpoint_ttl_from_tinker_path_async = deprecated_async(set_checkpoint_ttl_from_tinker_path, returns_future=False)
    list_user_checkpoints_async = deprecated_async(list_user_checkpoints, returns_future=False)


async def _checkpoints(service: loops_core.ServiceClient, run_id: str) -> list[loops_core.Checkpoint]:
    try:
        return await service.list_checkpoints_async(run_id)
    except NotImplementedError:
        return []  # the backend keeps no listing: the run record alone describes the run


_NEVER = datetime.max.replace(tzinfo=timezone.utc)  # loops' file URLs do not expire


def _parse(path: str) -> tuple[str, str, str]:
    parsed = parse_uri(path) if isinstance(path, str) else None
    if parsed is None:
        raise InvalidRequestError(f"{path!r} is not a checkpoint path tinker://<run>/<weights|sampler_weights>/<name>",
                                  field="tinker_path")
    return parsed
