"""What the Baseten emulator runs behind its gateway: deployments of trainer and sampler servers.

A ``Deployment`` is one trainer or sampler: an ASGI app (once provisioned), the status the control
plane reports for it, and the switches fault injection flips. Two provisioners make the apps:

* ``FakeProvisioner``: the fake backend's paired servers (``fake_pair``), in the emulator's process;
* ``LocalProvisioner``: ``loops serve-trainer`` / ``serve-sampler`` subprocesses, as the local
  backend starts them (``ServerProcess``), reached through a small reverse proxy.

Either way the client reaches them over HTTP at ``<emulator>/gw/<deployment_id>/sync/...``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx

from loops_core.checkpoints import CheckpointStore, loops_home

from .models import SAMPLER_TERMINAL, SCALED_TO_ZERO, TRAINER_TERMINAL

ASGIApp = Callable[..., Awaitable[None]]
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "authorization"}


@dataclass
class Deployment:
    kind: str                          # "trainer" or "sampler"
    base_model: str
    run_id: str | None = None          # trainers and paired samplers
    sampler_id: str | None = None      # samplers
    model_id: str | None = None        # samplers
    id: str = field(default_factory=lambda: f"dep-{uuid.uuid4().hex[:10]}")
    app: ASGIApp | None = None
    final: str = "ACTIVE"              # the status once provisioned and past ``pending``
    pending: list[str] = field(default_factory=list)  # reported first, one per status poll
    override: str | None = None        # set by faults / the admin route (SCALED_TO_ZERO, STOPPED, ...)
    provisioned: bool = False
    error: str | None = None
    shutting_down: bool = False
    status_polls: int = 0
    health_hits: int = 0
    # Tests wait on hits instead of sleeping: notified on every /health the gateway forwards.
    hit: threading.Condition = field(default_factory=threading.Condition, repr=False, compare=False)
    closer: Callable[[], Any] | None = None
    serverless: bool = False           # no deployment of its own to report: model_id / deployment_id null
    queue: Any = None                  # a serverless sampler's SampleQueue (emulator_serverless)

    def count_health_hit(self) -> None:
        with self.hit:
            self.health_hits += 1
            self.hit.notify_all()

    def wait_for_hits(self, n: int, timeout: float = 10.0) -> bool:
        """Block until ``health_hits`` reaches ``n`` (False after ``timeout`` seconds)."""
        with self.hit:
            return self.hit.wait_for(lambda: self.health_hits >= n, timeout)

    def status(self, *, consume: bool = False) -> str:
        if consume:
            self.status_polls += 1
        if self.override:
            return self.override
        if self.error:
            return "FAILED" if self.kind == "trainer" else "BUILD_FAILED"
        if not self.provisioned:
            return "BUILDING"
        if self.pending:
            return self.pending.pop(0) if consume else self.pending[0]
        return self.final

    @property
    def terminal(self) -> bool:
        return self.status() in (TRAINER_TERMINAL | SAMPLER_TERMINAL)

    def wake(self) -> bool:
        if self.override != SCALED_TO_ZERO:
            return False
        self.override = None
        self.pending.insert(0, "WAKING_UP")
        return True

    async def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
        closer, self.closer = self.closer, None
        if closer is not None:
            result = closer()
            if asyncio.iscoroutine(result):
                await result


class FakeProvisioner:
    """In-process fake servers (numpy engine); provisioning is instant."""

    engine = "fake"
    instant = True
    features = ("sampler_pinning", "deterministic")

    def __init__(self, store: CheckpointStore):
        self.store = store

    async def trainer(self, trainer: Deployment, sampler: Deployment, *, rank: int, seed: int | None) -> None:
        from loops_backends.fake.backend import fake_pair

        t, s = fake_pair(trainer.base_model, rank=rank, seed=seed, run_id=trainer.run_id, store=self.store)
        trainer.app, sampler.app = t.app, s.app
        trainer.closer = t.close
        sampler.closer = lambda: setattr(s, "shutting_down", True)

    async def sampler(self, sampler: Deployment) -> None:
        from loops_backends.fake.engine import FakeSamplerEngine
        from loops_core.server.sampler import SamplerServer

        s = SamplerServer(FakeSamplerEngine(sampler.base_model), store=self.store)
        sampler.app = s.app
        sampler.closer = lambda: setattr(s, "shutting_down", True)


class LocalProvisioner:
    """``loops serve-*`` subprocesses (torch by default; ``server_engine="fake"`` for quick tests)."""

    engine = "local"
    instant = False
    features = ("sampler_pinning",)

    def __init__(self, *, server_engine: str = "local", sampler_engine: str = "auto", ready_timeout: float = 900.0):
        self.server_engine = server_engine
        self.sampler_engine = sampler_engine
        self.ready_timeout = ready_timeout

    def _spawn(self, role: str, dep: Deployment, extra: list[str]) -> Any:
        from loops_backends.local_gpu.backend import ServerProcess

        args = ["--model", dep.base_model, "--engine", self.server_engine, "--sampler-engine", self.sampler_engine,
                *extra]
        return ServerProcess(role, args, loops_home() / "logs" / f"emulator-{dep.id}-{role}.log")

    async def trainer(self, trainer: Deployment, sampler: Deployment, *, rank: int, seed: int | None) -> None:
        from loops_backends.local_gpu.backend import free_port

        port = free_port()
        s = self._spawn("sampler", sampler, ["--port", str(port)])
        t = self._spawn("trainer", trainer, [
            "--port", "0", "--run-id", trainer.run_id or "", "--rank", str(rank),
            "--sampler-url", f"http://127.0.0.1:{port}", *(["--seed", str(seed)] if seed is not None else [])])
        try:
            s_url, t_url = await asyncio.gather(s.ready(self.ready_timeout), t.ready(self.ready_timeout))
        except BaseException:
            await asyncio.gather(asyncio.to_thread(s.stop), asyncio.to_thread(t.stop))
            raise
        trainer.app, sampler.app = ProxyApp(t_url), ProxyApp(s_url)
        trainer.closer = _stopper(t, trainer.app)
        sampler.closer = _stopper(s, sampler.app)

    async def sampler(self, sampler: Deployment) -> None:
        p = self._spawn("sampler", sampler, ["--port", "0"])
        url = await p.ready(self.ready_timeout)
        sampler.app = ProxyApp(url)
        sampler.closer = _stopper(p, sampler.app)


def _stopper(process: Any, proxy: "ProxyApp") -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        await proxy.aclose()
        await asyncio.to_thread(process.stop)

    return stop


class ProxyApp:
    """A minimal reverse proxy (buffered bodies, which is all the Loops protocol uses)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600.0, connect=10.0))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k.decode().lower() not in HOP_HEADERS]
        try:
            r = await self._client.request(scope["method"], scope["path"], params=scope["query_string"].decode(),
                                           headers=headers, content=body)
            status, content = r.status_code, r.content
            out = [(k.encode(), v.encode()) for k, v in r.headers.items() if k.lower() not in HOP_HEADERS
                   and k.lower() != "content-encoding"]
        except httpx.HTTPError as exc:
            status, content = 502, f'{{"detail": "upstream unreachable: {type(exc).__name__}"}}'.encode()
            out = [(b"content-type", b"application/json")]
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": content})

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
