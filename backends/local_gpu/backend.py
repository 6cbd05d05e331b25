"""The local backend: a trainer and a sampler server as subprocesses on loopback.

``create_lora_training_client`` starts ``loops serve-sampler`` and ``loops serve-trainer`` (in
parallel, on free ports), waits until both print their ready line, and pairs them: the trainer
publishes adapters to its sampler. The training clients of one ServiceClient on the same base model
share that pair (the base model is loaded once), each with a run of its own (``POST /runs``); only
when the trainer cannot host another run (an engine that holds one, or its run cap) does a client
get a pair of its own. They stop when the ServiceClient closes, when this process
exits, and, through their parent watchdog, when this process dies without exiting (a crash or
SIGKILL): no orphans.

With one GPU the trainer starts first and the sampler after it is up, so that the sampler's
memory share is planned from what the trainer left (``placement.py``). A client waiting on a
server whose process has exited is told at once, with the exit code and the log's last lines.
Only the paired trainer may publish to its sampler: both get one random ``LOOPS_PUBLISH_TOKEN``.

Options: ``LocalSettings`` below (keyword to ``ServiceClient(backend="local", ...)`` > ``LOOPS_*``
environment > default). Server logs go to ``$LOOPS_HOME/logs/``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loops_core.backend import Backend, LocalCheckpoints, SamplerHandle, TrainerHandle
from loops_core.checkpoints import CheckpointStore, loops_home, read_meta
from loops_core.direct import close_run, create_run
from loops_core.errors import APIConnectionError, InvalidRequestError, ServerShutdownError
from loops_core.settings import load_settings
from loops_core.types import ServerCapabilities, SupportedModel
from loops_core.wire import Endpoint, WireClient

_LIVE: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSettings(BaseSettings):
    """Options of the local backend."""

    model_config = SettingsConfigDict(env_prefix="LOOPS_", extra="forbid")

    sampler_engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when it imports and CUDA is present, else HF")
    engine: Literal["local", "fake"] = Field(
        "local", description="fake runs the numpy engine in the same server processes (tests of provisioning)")
    activation_headroom_gb: float | None = Field(
        None, gt=0, description="GPU memory kept for the trainer's activations when the sampler shares its GPU")


class ServerProcess:
    """One ``loops serve-*`` child process and its log file."""

    def __init__(self, role: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log, "ab")
        cmd = [sys.executable, "-m", "loops_core.cli", f"serve-{role}", *args, "--parent-pid", str(os.getpid())]
        # Both servers keep torch's default threads: in a synchronous loop they take turns (set
        # OMP_NUM_THREADS to split the cores when sampling and training overlap, as in async RL).
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_file, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)  # our Ctrl-C goes to us; we stop the child
        self.url: str | None = None
        _LIVE.add(self)

    async def ready(self, timeout: float) -> str:
        """Wait for the ready line; returns the server URL."""
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), max(remaining, 0.1))
            except asyncio.TimeoutError:
                self.stop()
                raise APIConnectionError(f"the local {self.role} did not start within {timeout:.0f} s; "
                                         f"log: {self.log}\n{self.tail()}") from None
            if not line:
                self.proc.wait(5)
                raise APIConnectionError(f"the local {self.role} exited with code {self.proc.returncode} before "
                                         f"it was ready; log: {self.log}\n{self.tail()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                self.url = msg["urls"][self.role]
                return self.url

    def gone(self) -> str | None:
        """Why this server can no longer answer (its process exited), else None."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"the local {self.role} process exited with code {code}; log: {self.log}\n{self.tail(10)}"

    def endpoint(self) -> Endpoint:
        assert self.url is not None
        return Endpoint(url=self.url, liveness=self.gone)

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        _LIVE.discard(self)


@atexit.register
def _stop_all() -> None:
    for p in list(_LIVE):
        p.stop(grace=2.0)


class LocalBackend(LocalCheckpoints, Backend):
    name = "local"
    capabilities = frozenset({"checkpoints", "checkpoint_delete", "sampler_pinning", "standalone_sampler",
                              "tokenizer"})

    def __init__(self, config):  # noqa: ANN001
        super().__init__(config)
        self.settings: LocalSettings = load_settings(LocalSettings, **config.options)  # type: ignore[assignment]
        self.processes: list[ServerProcess] = []
        self.pairs: dict[str, tuple[Endpoint, Endpoint]] = {}  # base model -> (trainer, sampler), shared
        self.run_trainers: dict[str, Endpoint] = {}  # run id -> the trainer holding it
        self._pair_lock: asyncio.Lock | None = None

    async def start_session(self) -> str:
        return f"local-{uuid.uuid4().hex[:12]}"

    def _spawn(self, role: str, base_model: str, run_id: str, extra: list[str],
               env: dict[str, str] | None = None) -> ServerProcess:
        s = self.settings
        args = ["--model", base_model, "--engine", s.engine, "--sampler-engine", s.sampler_engine, *extra]
        if s.activation_headroom_gb is not None:
            args += ["--activation-headroom-gb", str(s.activation_headroom_gb)]
        p = ServerProcess(role, args, loops_home() / "logs" / f"{run_id}-{role}.log", env)
        self.processes.append(p)
        return p

    async def create_trainer(self, base_model: str, *, rank: int, seed: int | None, ready_timeout: float,
                             max_seq_len: int | None = None) -> TrainerHandle:
        self._pair_lock = self._pair_lock or asyncio.Lock()
        run_id = f"run-{uuid.uuid4().hex[:12]}"  # also names the logs of a pair started for it
        async with self._pair_lock:  # two clients created at once share one pair, not start two
            if base_model not in self.pairs:
                self.pairs[base_model] = await self._start_pair(base_model, run_id, rank, seed, ready_timeout)
            trainer, sampler = self.pairs[base_model]
        try:
            return await self._new_run(trainer, sampler, base_model, run_id, rank, seed)
        except ServerShutdownError:  # this trainer cannot host another run: a pair of its own
            trainer, sampler = await self._start_pair(base_model, run_id, rank, seed, ready_timeout)
            return await self._new_run(trainer, sampler, base_model, run_id, rank, seed)

    async def _new_run(self, trainer: Endpoint, sampler: Endpoint, base_model: str, run_id: str, rank: int,
                       seed: int | None) -> TrainerHandle:
        wire = WireClient(trainer, timeout=60.0, ready_timeout=60.0)
        try:
            handle = await create_run(wire, trainer, sampler, base_model, rank=rank, seed=seed, run_id=run_id)
        finally:
            await wire.aclose()
        self.run_trainers[handle.run_id] = trainer
        return handle

    async def _start_pair(self, base_model: str, run_id: str, rank: int, seed: int | None,
                          ready_timeout: float) -> tuple[Endpoint, Endpoint]:
        pair_id = f"{run_id}-pair"  # the trainer's default run, for requests that name none
        sampler_port = free_port()
        env = {"LOOPS_PUBLISH_TOKEN": secrets.token_urlsafe(24)}  # only this trainer may publish there
        spawn_sampler = lambda: self._spawn("sampler", base_model, run_id, ["--port", str(sampler_port)], env)  # noqa: E731
        started = []
        try:
            trainer = self._spawn("trainer", base_model, run_id, [
                "--port", "0", "--run-id", pair_id, "--rank", str(rank), "--sampler-url",
                f"http://127.0.0.1:{sampler_port}", *(["--seed", str(seed)] if seed is not None else [])], env)
            started.append(trainer)
            if self.settings.engine == "local" and _one_gpu():  # the sampler plans from what the trainer left
                await trainer.ready(ready_timeout)
                started.append(spawn_sampler())
                await started[-1].ready(ready_timeout)
            else:
                started.append(spawn_sampler())
                await asyncio.gather(*(p.ready(ready_timeout) for p in started))
        except BaseException:
            for p in started:
                p.stop()
            raise
        return trainer.endpoint(), started[1].endpoint()

    async def release_trainer(self, run_id: str) -> None:
        trainer = self.run_trainers.pop(run_id, None)
        if trainer is None:
            return
        wire = WireClient(trainer, timeout=30.0, ready_timeout=30.0)
        try:
            await close_run(wire, run_id)
        except (APIConnectionError, ServerShutdownError):
            pass  # the trainer is gone: nothing left to free
        finally:
            await wire.aclose()

    async def create_sampler(self, base_model: str | None, *, ready_timeout: float,
                             model_path: str | None = None) -> SamplerHandle:
        if model_path is not None:
            meta = read_meta(CheckpointStore().resolve(model_path, kind="sampler_weights"))
            base_model = meta.get("base_model")
            if not base_model:
                raise InvalidRequestError(f"{model_path!r} does not record its base model", field="model_path")
        assert base_model is not None
        sampler_id = f"sampler-{uuid.uuid4().hex[:12]}"
        proc = self._spawn("sampler", base_model, sampler_id, ["--port", "0"])
        await proc.ready(ready_timeout)
        return SamplerHandle(sampler=proc.endpoint(), base_model=base_model, sampler_id=sampler_id,
                             checkpoint_path=model_path)

    async def get_server_capabilities(self) -> ServerCapabilities:
        gpu = ["cuda"] if shutil.which("nvidia-smi") else ["cpu"]
        return ServerCapabilities(supported_models=[
            SupportedModel(model_name="loops/tiny-qwen3", max_context_length=2048, gpu_classes=gpu),
            SupportedModel(model_name="any local directory or Hugging Face id in the local cache",
                           max_context_length=None, gpu_classes=gpu)])

    async def aclose(self) -> None:
        self.pairs.clear()
        self.run_trainers.clear()
        procs, self.processes = self.processes, []
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


def _one_gpu() -> bool:
    from .placement import trainer_first

    return trainer_first()
