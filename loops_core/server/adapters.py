"""The sampler's adapters: every run's published versions, and checkpoints asked for by path.

An adapter is a record (run, policy version, path) with an engine id of its own (fresh per load, so
a reloaded version never serves stale weights). The engine holds at most ``max_resident`` adapters
at once: the least recently used idle one is unloaded to make room, and reloaded from its path when
it is asked for again. A record is forgotten when it is not its run's live version, not among the
run's newest ``keep_versions``, and unused for ``idle_unload_s`` seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from ..checkpoints import CheckpointStore
from ..engine import SamplerEngine
from ..errors import InvalidRequestError


@dataclass
class Adapter:
    engine_id: int  # a fresh id per load, so a reloaded version never serves stale weights
    name: str
    path: str
    run_id: str | None
    policy_version: int | None  # None: a checkpoint loaded by path
    last_used: float
    resident: bool = False
    in_use: int = 0  # requests being served from it: never evicted meanwhile


class AdapterTable:
    def __init__(self, engine: SamplerEngine, store: CheckpointStore, *, keep_versions: int = 4,
                 idle_unload_s: float = 1800.0, max_resident: int = 16):
        self.engine = engine
        self.store = store
        self.keep_versions = keep_versions
        self.idle_unload_s = idle_unload_s
        self.max_resident = max_resident
        self.adapters: dict[int, Adapter] = {}  # by engine id
        self.versions: dict[tuple[str | None, int], Adapter] = {}  # (run, policy version) -> adapter
        self.live: dict[str | None, Adapter] = {}  # each run's newest published version
        self._ids = itertools.count(1)
        self.lock = asyncio.Lock()  # held while the engine loads or unloads

    def live_version(self, run: str | None) -> int:
        a = self.live.get(run)
        return (a.policy_version or 0) if a else 0

    @property
    def resident(self) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.resident]

    async def publish(self, name: str, path: str, directory: Any, run: str | None, version: int | None) -> int:
        """Load a run's published version (default: the next one) and make it the run's live one."""
        async with self.lock:
            if version is None:
                version = self.live_version(run) + 1
            old = self.versions.get((run, version))
            adapter = Adapter(next(self._ids), name, path, run, version, time.monotonic())
            await self.make_resident(adapter, directory)  # a bad adapter fails here and changes nothing
            if old is not None:
                await self.drop(old)
            self.adapters[adapter.engine_id] = adapter
            self.versions[(run, version)] = adapter
            if version >= self.live_version(run):
                self.live[run] = adapter
            await self.collect()
        return version

    async def unload_named(self, name: str) -> bool:
        async with self.lock:
            hits = [a for a in self.adapters.values() if a.name == name]
            for a in hits:
                await self.drop(a)
        return bool(hits)

    async def ensure_resident(self, adapter: Adapter) -> None:
        if not adapter.resident:
            async with self.lock:
                await self.make_resident(adapter)

    async def make_resident(self, adapter: Adapter, directory: Any = None) -> None:
        """Load ``adapter`` into the engine, first evicting the least recently used idle ones past the cap."""
        if adapter.resident:
            return
        others = sorted((a for a in self.resident if a.in_use == 0), key=lambda a: a.last_used)
        while others and len(self.resident) >= self.max_resident:
            victim = others.pop(0)
            await self.engine.unload_adapter(victim.engine_id)
            victim.resident = False
        await self.engine.load_adapter(adapter.engine_id, directory or self.store.resolve(adapter.path))
        adapter.resident = True

    async def drop(self, a: Adapter) -> None:
        """Forget an adapter record (and unload it)."""
        self.adapters.pop(a.engine_id, None)
        if a.policy_version is not None and self.versions.get((a.run_id, a.policy_version)) is a:
            del self.versions[(a.run_id, a.policy_version)]
        if a.resident:
            await self.engine.unload_adapter(a.engine_id)
            a.resident = False
        if self.live.get(a.run_id) is a:
            pubs = [x for (run, _), x in self.versions.items() if run == a.run_id]
            if pubs:
                self.live[a.run_id] = max(pubs, key=lambda x: x.policy_version or 0)
            else:
                del self.live[a.run_id]

    async def collect(self) -> None:
        """Forget versions that are not their run's live one, not among its newest few, and idle."""
        now = time.monotonic()
        keep: set[int] = set()
        by_run: dict[str | None, list[Adapter]] = {}
        for a in self.adapters.values():
            by_run.setdefault(a.run_id, []).append(a)
        for run_adapters in by_run.values():
            keep.update(a.engine_id for a in sorted(run_adapters, key=lambda a: a.engine_id)[-self.keep_versions:])
        live = {id(a) for a in self.live.values()}
        for a in list(self.adapters.values()):
            if id(a) not in live and a.engine_id not in keep and a.in_use == 0 \
                    and now - a.last_used > self.idle_unload_s:
                await self.drop(a)

    async def by_path(self, path: str, run: str | None, *, max_adhoc: int = 8) -> Adapter:
        """The adapter of a checkpoint asked for by path (loaded on first use). Keyed by the resolved
        directory, so other spellings of one path share one adapter; beyond ``max_adhoc`` such
        adapters the least recently used is forgotten."""
        directory = self.store.resolve(path, kind="sampler_weights")  # the kind is checked for URIs only
        key = str(directory.resolve())
        hits = [a for a in self.adapters.values() if a.path in (path, key)]
        if hits:
            return max(hits, key=lambda a: a.engine_id)
        async with self.lock:
            a = Adapter(next(self._ids), path.rstrip("/").rsplit("/", 1)[-1], key, run, None, time.monotonic())
            try:
                await self.make_resident(a, directory)
            except Exception as exc:  # a directory that only looks like an adapter: the client's input
                raise InvalidRequestError(f"cannot load the adapter at {path[:200]!r}: {type(exc).__name__}: "
                                          f"{str(exc)[:200]}", field="X-Checkpoint-Path") from None
            self.adapters[a.engine_id] = a
            adhoc = sorted((x for x in self.adapters.values() if x.policy_version is None and x is not a
                            and x.in_use == 0), key=lambda x: x.last_used)
            for old in adhoc[:max(0, len(adhoc) + 1 - max_adhoc)]:
                await self.drop(old)
            await self.collect()
        return a
