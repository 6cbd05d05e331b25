"""The Modal backend: the same trainer and sampler servers as ``local``, in Modal containers.

``create_lora_training_client`` starts two ephemeral Modal apps, a sampler (vLLM, or HF) and a
trainer (torch + peft) whose configuration names the sampler's URL, waits until both answer
``/health``, and returns clients bound to their web URLs. Checkpoints live on the
``loops-checkpoints`` Volume: the trainer commits it after every save, the sampler reloads it
before it loads a version, and ``list_checkpoints`` / ``get_checkpoint_archive_url`` read it
from here.

Security. Every session draws a random API key; the containers get it in a Modal secret and the
servers refuse any request without ``Authorization: Api-Key <key>`` (``/health`` aside), so the
public ``*.modal.run`` URLs are not open to the internet.

Lifetime and cost. A container is billed per second while it runs. Containers start on the first
request and stop after ``scaledown`` idle seconds (900 by default; the trainer resumes from its
newest save_state if it is restarted). ``ServiceClient.close()`` stops every app the session
started; if the process dies instead, Modal stops its ephemeral apps once the client's heartbeats
stop. ``detach=True`` keeps them running after this process for ``reuse_from_session_id``; stop
them with ``modal app stop <app-id>`` (apps started with ``app.run()`` are named by id, ``ap-...``;
errors and logs give them). ``close()`` also runs at interpreter exit, and stops apps still being
started (Ctrl-C during provisioning); a failed start stops its apps, detached or not.

Failing containers. A server that cannot start answers ``/health`` with its error, reported at
once; a container that keeps dying before it serves (Modal's proxy answers 5xx) is reported after
``CRASH_WINDOW_S``, not retried until ``ready_timeout``. Both name the app id and the command that
shows its logs.

The provisioning seam is ``platform.Platform``; ``ModalPlatform`` implements it with the modal
client. Tests run that client against ``fake_control_plane.FakeModal`` (``contract_environment``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
import uuid
import warnings
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx

from loops_core.backend import Backend, SamplerHandle, TrainerHandle
from loops_core.checkpoints import KINDS, META, check_name, parse_uri
from loops_core.errors import APIConnectionError, InvalidRequestError, NotFoundError
from loops_core.retry import READINESS
from loops_core.types import (Checkpoint, CheckpointDownload, CheckpointFile, CheckpointFilesResponse,
                              ServerCapabilities, SupportedModel)
from loops_core.wire import Endpoint

from .container import ContainerConfig, ContainerSpec
from .platform import ModalPlatform, Platform, Started
from .settings import GPU_CLASSES, ModalSettings, modal_settings

log = logging.getLogger("loops.modal")
HEALTH_TIMEOUT = httpx.Timeout(160.0, connect=30.0)  # a cold container may hold the first request ~150 s
# How long Modal's proxy may answer 5xx for a container that does not come up before we call it a
# crash at start (a cold start holds the request instead; it does not answer 5xx).
CRASH_WINDOW_S = 120.0


class ModalBackend(Backend):
    name = "modal"
    capabilities = frozenset({"checkpoints", "checkpoint_delete", "sampler_pinning", "standalone_sampler",
                              "tokenizer"})

    def __init__(self, config):  # noqa: ANN001
        super().__init__(config)
        self.settings: ModalSettings = modal_settings(**config.options)
        # Checks for Modal credentials now, so missing ones fail at once.
        self.platform: Platform = ModalPlatform(self.settings)
        self.api_key = secrets.token_urlsafe(32)
        self.session_id = ""
        self._started: list[Started] = []
        self._pairs: list[dict[str, Any]] = []      # what this session runs (its reuse record)
        self._reusable: list[dict[str, Any]] = []   # pairs of the session named by reuse_from_session_id
        self._adopted: list[dict[str, Any]] = []
        self._count = 0
        self._closing = False
        # A script that ends without close() must not leave GPUs running until Modal notices the
        # missing heartbeats. Registered after modal's own atexit hooks, so it runs before them,
        # while the modal client can still talk.
        self._atexit = _close_at_exit(weakref.ref(self))
        atexit.register(self._atexit)

    @classmethod
    @contextlib.contextmanager
    def contract_environment(cls) -> Iterator[None]:
        """The contract suite runs the real modal client against the fake control plane (numpy
        engine unless ``LOOPS_MODAL_ENGINE`` says otherwise), or on Modal with ``LOOPS_MODAL_CONTRACT=real``."""
        if os.environ.get("LOOPS_MODAL_CONTRACT", "").lower() == "real":
            yield
            return
        from .fake_control_plane import FakeModal

        engine = os.environ.get("LOOPS_MODAL_ENGINE")
        os.environ["LOOPS_MODAL_ENGINE"] = engine or "fake"
        try:
            with FakeModal().active():
                yield
        finally:
            if engine is None:
                os.environ.pop("LOOPS_MODAL_ENGINE", None)

    # ---- sessions -------------------------------------------------------------------------------
    async def start_session(self) -> str:
        self.session_id = f"modal-{uuid.uuid4().hex[:12]}"
        reuse = self.config.reuse_from_session_id
        if reuse:
            record = await self.platform.get_record(reuse)
            if record:
                self._reusable = list(record.get("pairs", []))
            else:
                warnings.warn(f"loops: no Modal session {reuse!r} is recorded; starting new containers",
                              RuntimeWarning, stacklevel=2)
        return self.session_id

    def _app_name(self, role: str) -> str:
        return f"loops-{self.session_id.removeprefix('modal-')}-{self._count}-{role}"

    def _config(self, role: str, base_model: str, run_id: str, **kw: Any) -> ContainerConfig:
        return ContainerConfig(role=role, base_model=base_model, run_id=run_id, api_key=self.api_key,
                               engine=self.settings.engine, sampler_engine=self.settings.sampler_engine,
                               volume=self.settings.volume, **kw)

    async def _start(self, config: ContainerConfig, gpu: str | None) -> Started:
        spec = ContainerSpec(app_name=self._app_name(config.role), config=config, gpu=gpu,
                             scaledown=self.settings.scaledown, hf_token=self.settings.hf_token_value(),
                             detach=self.settings.detach, output=self.settings.output)
        started = await self.platform.start(spec)
        self._started.append(started)
        if self._closing:  # closed (or the interpreter is exiting) while this one was starting
            await self._stop([started], terminate=True)
            raise APIConnectionError(f"the session was closed while the Modal {config.role} was starting")
        return started

    def _endpoint(self, url: str, key: str) -> Endpoint:
        # Keys are never pickled: a pickled client re-reads it from ``api_key_env``. The variable is
        # named after the key and set here, so clients unpickled in this process or its children
        # find it; elsewhere, export it (the error names it).
        env = f"LOOPS_MODAL_API_KEY_{hashlib.sha256(key.encode()).hexdigest()[:12].upper()}"
        os.environ[env] = key
        return Endpoint(url=url, api_key=key, api_key_env=env)

    # ---- provisioning -------------------------------------------------------------------------
    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        pair = await self._reuse(base_model, ready_timeout)
        if pair is None:
            self._count += 1
            run_id = f"run-{uuid.uuid4().hex[:12]}"
            mine: list[Started] = []
            try:
                sampler = await self._start(self._config("sampler", base_model, run_id, rank=rank),
                                            self.settings.sampler_gpu)
                mine.append(sampler)
                trainer = await self._start(self._config("trainer", base_model, run_id, rank=rank, seed=seed,
                                                         sampler_url=sampler.url), self.settings.gpu)
                mine.append(trainer)
                await asyncio.gather(wait_healthy(sampler, ready_timeout), wait_healthy(trainer, ready_timeout))
            except BaseException:
                await self._stop(mine, terminate=True)
                raise
            pair = {"run_id": run_id, "base_model": base_model, "trainer_url": trainer.url,
                    "sampler_url": sampler.url, "api_key": self.api_key,
                    "app_ids": [s.app_id for s in mine if s.app_id], "apps": [s.app_name for s in mine]}
            self._pairs.append(pair)
            await self._save_record()
        return TrainerHandle(trainer=self._endpoint(pair["trainer_url"], pair["api_key"]),
                             sampler=self._endpoint(pair["sampler_url"], pair["api_key"]), run_id=pair["run_id"],
                             base_model=base_model, sampler_id=pair["apps"][0] if pair.get("apps") else None)

    async def _reuse(self, base_model: str, ready_timeout: float) -> dict[str, Any] | None:
        """A still-running pair of the session named by ``reuse_from_session_id``, for this model:
        the recorded pairs are tried in turn, and one that does not answer is dropped."""
        for pair in [p for p in self._reusable if p.get("base_model") == base_model]:
            self._reusable.remove(pair)
            names = dict(zip(("sampler", "trainer"), pair.get("apps", [])))
            ids = dict(zip(("sampler", "trainer"), pair.get("app_ids", [])))
            probes = [Started(role, pair[f"{role}_url"], ids.get(role), names.get(role, role), _noop)
                      for role in ("sampler", "trainer")]
            try:
                await asyncio.gather(*(wait_healthy(p, ready_timeout, probe=True) for p in probes))
            except APIConnectionError as exc:
                log.warning("not reusing run %s: %s", pair.get("run_id"), exc)
                continue
            self._adopted.append(pair)
            self._pairs.append(pair)
            await self._save_record()
            return pair
        return None

    async def _save_record(self) -> None:
        try:
            await self.platform.put_record(self.session_id, {"pairs": self._pairs, "updated": time.time()})
        except Exception as exc:  # reuse is a convenience; provisioning succeeded
            log.warning("could not record Modal session %s for reuse: %s", self.session_id, exc)

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        rank = None
        if model_path is not None:
            meta = await self._checkpoint_meta(model_path, kind="sampler_weights")
            base_model = meta.get("base_model")
            rank = (meta.get("lora_adapter_config") or {}).get("r")
            if not base_model:
                raise InvalidRequestError(f"{model_path!r} does not record its base model", field="model_path")
        assert base_model is not None
        self._count += 1
        sampler_id = f"sampler-{uuid.uuid4().hex[:12]}"
        started = await self._start(self._config("sampler", base_model, sampler_id, rank=rank),
                                    self.settings.sampler_gpu)
        try:
            await wait_healthy(started, ready_timeout)
        except BaseException:
            await self._stop([started], terminate=True)
            raise
        return SamplerHandle(sampler=self._endpoint(started.url, self.api_key), base_model=base_model,
                             sampler_id=sampler_id, checkpoint_path=model_path)

    async def get_server_capabilities(self) -> ServerCapabilities:
        chosen = [g for g in (self.settings.gpu, self.settings.sampler_gpu) if g]
        gpus = list(dict.fromkeys([*chosen, *GPU_CLASSES])) if chosen else ["cpu"]
        return ServerCapabilities(supported_models=[
            SupportedModel(model_name="loops/tiny-qwen3", max_context_length=2048, gpu_classes=gpus),
            SupportedModel(model_name="any Hugging Face causal LM id the trainer can load (e.g. Qwen/Qwen3-0.6B, "
                                      "Qwen/Qwen3-8B); set HF_TOKEN for gated ones",
                           max_context_length=None, gpu_classes=gpus)])

    # ---- checkpoints, read from the Volume ------------------------------------------------------
    async def _checkpoint_meta(self, path: str, *, kind: str) -> dict[str, Any]:
        parsed = parse_uri(path) if isinstance(path, str) else None
        if parsed is None:
            raise InvalidRequestError(
                f"model_path={path!r}: on Modal a checkpoint is named by its URI, "
                "loops://<run>/sampler_weights/<name> (the containers read it from the Volume)", field="model_path")
        run_id, k, name = parsed
        if k != kind:
            raise InvalidRequestError(f"path {path!r} is a {k} checkpoint; this call needs a {kind} checkpoint",
                                      field="model_path")
        raw = await self.platform.read_file(f"runs/{run_id}/{k}/{name}/{META}")
        if raw is None:
            raise NotFoundError(f"checkpoint {path!r} not found on the Modal volume {self.settings.volume!r}",
                                status_code=404)
        return json.loads(raw)

    async def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        check_name(run_id, "run_id")
        entries = await self.platform.listdir(f"runs/{run_id}")
        metas = [e.path for e in entries if not e.is_dir and _is_meta(e.path, run_id)]
        raws = await asyncio.gather(*(self.platform.read_file(p) for p in metas))
        return sorted((Checkpoint.model_validate_json(r) for r in raws if r), key=lambda c: c.created_at)

    async def get_checkpoint_archive_url(self, checkpoint_id: str, page_size: int = 1000,
                                         page_token: int = 0) -> CheckpointFilesResponse:
        if page_size <= 0 or page_token < 0:
            raise InvalidRequestError("page_size must be > 0 and page_token >= 0", field="page_size")
        run_id, kind, name = _split_checkpoint_id(checkpoint_id)
        base = f"runs/{run_id}/{kind}/{name}"
        files = sorted((e for e in await self.platform.listdir(base) if not e.is_dir), key=lambda e: e.path)
        if not any(e.path == f"{base}/{META}" for e in files):
            raise NotFoundError(f"checkpoint {checkpoint_id!r} not found on the Modal volume {self.settings.volume!r}",
                                status_code=404)
        page = files[page_token:page_token + page_size]
        nxt = page_token + page_size
        return CheckpointFilesResponse(
            presigned_urls=[CheckpointFile(url=self.platform.file_url(e.path),
                                           relative_file_name=e.path[len(base) + 1:], node_rank=0, size_bytes=e.size,
                                           last_modified=datetime.fromtimestamp(e.mtime, timezone.utc).isoformat())
                            for e in page],
            next_page_token=nxt if nxt < len(files) else None, total_count=len(files))

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        run_id, kind, name = _split_checkpoint_id(checkpoint_id)
        base = f"runs/{run_id}/{kind}/{name}"
        if await self.platform.read_file(f"{base}/{META}") is None:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} not found on the Modal volume {self.settings.volume!r}",
                                status_code=404)
        await self.platform.remove(base)

    async def download_checkpoint(self, checkpoint_id: str, dest_dir: str | Path) -> CheckpointDownload:
        """Every file of a checkpoint, read from the Volume through the modal client (its files have
        no public URL)."""
        from loops_core.download import prepare_dest, target_path

        files = await self.list_checkpoint_files(checkpoint_id)
        dest = prepare_dest(dest_dir)
        run_id, kind, name = _split_checkpoint_id(checkpoint_id)
        total = 0
        for f in files:
            data = await self.platform.read_file(f"runs/{run_id}/{kind}/{name}/{f.relative_file_name}")
            if data is None:
                raise NotFoundError(f"{f.relative_file_name} of checkpoint {checkpoint_id!r} vanished from the "
                                    f"Modal volume {self.settings.volume!r}", status_code=404)
            path = target_path(dest, f.relative_file_name)
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_bytes, data)
            total += len(data)
        return CheckpointDownload(dest_dir=str(dest), file_count=len(files), bytes_written=total)

    # ---- teardown -------------------------------------------------------------------------------
    async def _stop(self, started: list[Started], *, terminate: bool = False) -> None:
        """Leave each app's ``app.run()`` (which ends an ephemeral app); ``terminate`` also stops a
        detached one (a start that failed leaves nothing running)."""
        for s in reversed(started):
            if s in self._started:
                self._started.remove(s)
            try:
                await s.stop()
                if terminate and self.settings.detach and s.app_id:
                    await self.platform.stop_app(s.app_id)
            except Exception as exc:
                log.warning("could not stop Modal app %s (%s): %s; stop it with `modal app stop %s`",
                            s.app_id, s.app_name, exc, s.app_id)

    async def aclose(self) -> None:
        self._closing = True
        atexit.unregister(self._atexit)
        await self.platform.stop_pending()
        await self._stop(list(self._started))
        adopted, self._adopted = self._adopted, []
        if not self.settings.detach:  # a reused pair is this session's now: it goes with it
            for pair in adopted:
                for app_id in pair.get("app_ids", []):
                    try:
                        await self.platform.stop_app(app_id)
                    except Exception as exc:
                        log.warning("could not stop Modal app %s: %s; stop it with `modal app stop %s`",
                                    app_id, exc, app_id)


def _close_at_exit(ref: "weakref.ref[ModalBackend]"):  # noqa: ANN202
    def close() -> None:
        backend = ref()
        if backend is None or backend._closing:
            return
        from loops_core.futures import run_sync

        try:
            run_sync(backend.aclose(), timeout=60)
        except Exception as exc:
            log.warning("closing the Modal session at exit failed: %s", exc)

    return close


async def _noop() -> None:
    return None


def _is_meta(path: str, run_id: str) -> bool:
    parts = path.split("/")
    return (len(parts) == 5 and parts[:2] == ["runs", run_id] and parts[2] in KINDS
            and not parts[3].startswith(".") and parts[4] == META)


def _split_checkpoint_id(checkpoint_id: str) -> tuple[str, str, str]:
    parts = checkpoint_id.split("/") if isinstance(checkpoint_id, str) else []
    if len(parts) != 3 or parts[1] not in KINDS:
        parsed = parse_uri(checkpoint_id) if isinstance(checkpoint_id, str) else None
        if not parsed:
            raise InvalidRequestError(
                f"checkpoint_id {checkpoint_id!r} is not of the form <run_id>/<weights|sampler_weights>/<name>",
                field="checkpoint_id")
        parts = list(parsed)
    check_name(parts[0], "checkpoint_id")
    check_name(parts[2], "checkpoint_id")
    return parts[0], parts[1], parts[2]


def logs_hint(started: Started) -> str:
    if started.app_id:
        return f"its logs: `modal app logs {started.app_id}` (app {started.app_name})"
    return f"its logs: the Modal dashboard (app {started.app_name})"


class _Definite(Exception):
    """A definite answer from a container that will not come up: ends the wait (READINESS would
    retry the ``APIConnectionError`` it carries)."""

    def __init__(self, error: APIConnectionError):
        super().__init__(str(error))
        self.error = error


async def wait_healthy(started: Started, timeout: float, *, probe: bool = False) -> None:
    """Wait until ``started`` answers ``GET /health`` with ok, retried by the ``READINESS`` policy
    for ``timeout`` seconds. Redirects are followed: Modal answers a request that waited 150 s for a
    cold container with a 303 to the same request. A server that failed to start says so (raised at
    once), and so does Modal for a stopped app (4xx); 5xx answers from Modal's proxy for longer than
    ``CRASH_WINDOW_S`` mean a container that dies before it serves."""
    last, failing_since = "no answer yet", None

    async def attempt(client: httpx.AsyncClient) -> None:
        nonlocal last, failing_since
        try:
            r = await client.get(started.url.rstrip("/") + "/health")
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
            raise APIConnectionError(last) from exc
        body = _json(r)
        if r.status_code == 200 and body.get("status") == "ok":
            return
        last = f"HTTP {r.status_code}: {r.text[:300]}"
        if body.get("status") == "failed":
            raise _Definite(APIConnectionError(f"the Modal {started.role} failed to start: {body.get('detail')}; "
                                               f"{logs_hint(started)}"))
        if 400 <= r.status_code < 500 and r.status_code not in (408, 425, 429):
            # Modal's answer for a stopped or unknown app; our /health never says 4xx
            raise _Definite(APIConnectionError(f"the Modal {started.role} at {started.url} answers {last}: its app "
                                               f"is stopped or gone; {logs_hint(started)}"))
        if r.status_code >= 500:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > CRASH_WINDOW_S:
                raise _Definite(APIConnectionError(
                    f"the Modal {started.role} container keeps failing at start ({last}, for "
                    f"{time.monotonic() - failing_since:.0f} s); {logs_hint(started)}"))
        else:
            failing_since = None
        raise APIConnectionError(f"not ready yet ({last})")  # a cold start, a 5xx within the window

    async with httpx.AsyncClient(follow_redirects=True, timeout=HEALTH_TIMEOUT) as client:
        try:
            async for state in READINESS.retrying(timeout):
                with state:
                    await attempt(client)
        except _Definite as exc:
            raise exc.error from None
        except APIConnectionError:
            what = "is not answering" if probe else f"was not healthy after {timeout:.0f} s"
            raise APIConnectionError(f"the Modal {started.role} at {started.url} {what} (last: {last}); "
                                     f"{logs_hint(started)}") from None


def _json(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
