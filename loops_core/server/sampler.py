"""The sampler server: vLLM's completions shape with token-id prompts, around a ``SamplerEngine``.

Routes::

    POST /sample (alias /v1/completions)  {prompt: [ids], n, temperature, top_p, top_k, max_tokens,
                                           seed, stop | stop_token_ids, prompt_logprobs}
    POST /v1/load_lora_adapter            {lora_name, lora_path, policy_version?}  (the trainer publishes)
    POST /v1/unload_lora_adapter          {lora_name}
    GET  /v1/models                       base model (parent null) + adapters (parent = base)
    GET  /trainers_policy_version, /policy_version, /health

Which weights serve a request, from its headers:

* ``X-Policy-Version: v``: exactly version ``v`` (loops' own pinned clients); 410 once it is gone.
* ``X-Checkpoint-Path: p`` with ``X-Min-Policy-Version: m``: the checkpoint at ``p`` until the live
  version reaches ``m``, then the live one (the published client's ``create_sampling_client``).
  Without ``m``: the checkpoint at ``p``, loaded on demand.
* ``X-Min-Policy-Version: m`` alone: the live version, or 408 while it is below ``m``.
* nothing: the live (latest published) version; the base model before any publication.

Every answer carries ``x-trainers-policy-version``: the policy version that was served (0 = base).
A version is kept while it is the live one, among the newest ``keep_versions``, or was used in the
last ``idle_unload_s`` seconds; the rest are unloaded from the engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..checkpoints import CheckpointStore
from ..engine import GenerationRequest, SamplerEngine
from ..errors import InvalidRequestError
from .stats import stats_route
from .incarnation import IncarnationMiddleware
from .http import ApiKeyMiddleware, error_response, guarded, json_body

DEFAULT_MAX_TOKENS = 16  # as vLLM's completions endpoint
_ADHOC_BASE = 1_000_000_000  # engine ids for checkpoints loaded by path, apart from policy versions


@dataclass
class Adapter:
    engine_id: int
    name: str
    path: str
    policy_version: int | None
    last_used: float


class SamplerServer:
    def __init__(self, engine: SamplerEngine, *, store: CheckpointStore | None = None, api_key: str | None = None,
                 keep_versions: int = 4, idle_unload_s: float = 1800.0, name: str | None = None):
        self.engine = engine
        self.store = store or CheckpointStore()
        self.keep_versions = keep_versions
        self.idle_unload_s = idle_unload_s
        self.model_name = name or engine.base_model
        self.adapters: dict[int, Adapter] = {}
        self.live: Adapter | None = None
        self.shutting_down = False
        self._next_adhoc = _ADHOC_BASE
        self._lock: asyncio.Lock | None = None
        routes = [
            Route("/sample", self._sample, methods=["POST"]),
            Route("/v1/completions", self._sample, methods=["POST"]),
            Route("/v1/load_lora_adapter", self._load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._unload, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/trainers_policy_version", self._version, methods=["GET"]),
            Route("/policy_version", self._version, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/stats", stats_route, methods=["GET"]),
        ]
        self.app = IncarnationMiddleware(ApiKeyMiddleware(Starlette(routes=routes), api_key))

    @property
    def live_version(self) -> int:
        return self.live.policy_version or 0 if self.live else 0

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ---- adapters -------------------------------------------------------------------------
    @guarded
    async def _load(self, request: Request) -> Response:
        body = await json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise InvalidRequestError("lora_name and lora_path are required strings", field="lora_name")
        version = body.get("policy_version")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise InvalidRequestError("policy_version must be a positive integer", field="policy_version")
        directory = self.store.resolve(path)
        async with self._locked():
            if version is None:
                version = self.live_version + 1
            if version in self.adapters:
                await self.engine.unload_adapter(version)
            await self.engine.load_adapter(version, directory)
            adapter = Adapter(version, name, path, version, time.monotonic())
            self.adapters[version] = adapter
            if self.live is None or version >= self.live_version:
                self.live = adapter
            await self._collect()
        return JSONResponse({"status": "ok", "lora_name": name, "policy_version": version})

    @guarded
    async def _unload(self, request: Request) -> Response:
        body = await json_body(request)
        name = body.get("lora_name")
        async with self._locked():
            hits = [a for a in self.adapters.values() if a.name == name]
            if not hits:
                return error_response(404, f"no adapter named {name!r} is loaded")
            for a in hits:
                await self._drop(a)
        return JSONResponse({"status": "ok"})

    async def _drop(self, a: Adapter) -> None:
        del self.adapters[a.engine_id]
        await self.engine.unload_adapter(a.engine_id)
        if self.live is a:
            pubs = [x for x in self.adapters.values() if x.policy_version]
            self.live = max(pubs, key=lambda x: x.policy_version or 0) if pubs else None

    async def _collect(self) -> None:
        """Unload versions that are not live, not among the newest few, and idle."""
        now = time.monotonic()
        newest = sorted(self.adapters.values(), key=lambda a: a.engine_id)[-self.keep_versions:]
        for a in list(self.adapters.values()):
            if a is not self.live and a not in newest and now - a.last_used > self.idle_unload_s:
                await self._drop(a)

    async def _by_path(self, path: str) -> Adapter:
        hits = [a for a in self.adapters.values() if a.path == path]
        if hits:
            return max(hits, key=lambda a: a.engine_id)
        directory = self.store.resolve(path, kind="sampler_weights")  # the kind is checked for URIs only
        async with self._locked():
            self._next_adhoc += 1
            a = Adapter(self._next_adhoc, path.rstrip("/").rsplit("/", 1)[-1], path, None, time.monotonic())
            await self.engine.load_adapter(a.engine_id, directory)
            self.adapters[a.engine_id] = a
        return a

    async def _choose(self, request: Request) -> Adapter | None | Response:
        h = request.headers
        try:
            exact = int(h["x-policy-version"]) if "x-policy-version" in h else None
            floor = int(h["x-min-policy-version"]) if "x-min-policy-version" in h else None
        except ValueError:
            raise InvalidRequestError("X-Policy-Version / X-Min-Policy-Version must be integers",
                                      field="X-Min-Policy-Version") from None
        path = h.get("x-checkpoint-path")
        if exact is not None:
            if exact == 0:
                return None
            if exact not in self.adapters:
                if exact > self.live_version:
                    return error_response(408, f"version {exact} is not loaded yet (live: {self.live_version})")
                return error_response(410, f"policy version {exact} is no longer kept by this sampler "
                                           f"(live: {self.live_version}); create a new sampling client")
            return self.adapters[exact]
        if path and (floor is None or self.live_version < floor):
            return await self._by_path(path)
        if floor is not None and self.live_version < floor:
            return error_response(408, f"sampler is at policy version {self.live_version}, below the requested "
                                       f"minimum {floor}; retry shortly", headers={"Retry-After": "1"})
        return self.live

    # ---- sampling ---------------------------------------------------------------------------
    @guarded
    async def _sample(self, request: Request) -> Response:
        if self.shutting_down:
            return error_response(503, "the sampler is shutting down")
        body = await json_body(request)
        gen = self._parse(body)
        chosen = await self._choose(request)
        if isinstance(chosen, Response):
            return chosen
        if chosen is not None:
            chosen.last_used = time.monotonic()
        gen.adapter = chosen.engine_id if chosen else None
        served = (chosen.policy_version or 0) if chosen else 0
        result = await self.engine.generate(gen)
        choices = []
        for i, s in enumerate(result.sequences):
            choices.append({
                "index": i, "text": s.text, "token_ids": s.tokens, "finish_reason": s.finish_reason,
                "sequence_id": uuid.uuid4().hex,
                "logprobs": {"tokens": [f"token_id:{t}" for t in s.tokens], "token_logprobs": s.logprobs}})
        out: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                               "model": chosen.name if chosen else self.model_name, "choices": choices,
                               "prompt_token_ids": gen.prompt,
                               "usage": {"prompt_tokens": len(gen.prompt),
                                         "completion_tokens": sum(len(s.tokens) for s in result.sequences)}}
        if gen.prompt_logprobs is not None:
            plp = _vllm_prompt_logprobs(gen.prompt, result.prompt_logprobs, result.prompt_topk)
            out["prompt_logprobs"] = plp
            for c in choices:  # vLLM repeats them on every choice; the published client reads them there
                c["prompt_logprobs"], c["prompt_token_ids"] = plp, gen.prompt
        return JSONResponse(out, headers={"x-trainers-policy-version": str(served)})

    def _parse(self, body: dict[str, Any]) -> GenerationRequest:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a list of token ids (tokenize on the client)", field="prompt")
        if body.get("model_input_chunks") or body.get("structured_outputs"):
            raise InvalidRequestError("image chunks and structured_outputs are not supported by this sampler",
                                      field="model_input_chunks")
        if not prompt:
            raise InvalidRequestError("prompt is empty", field="prompt")
        v = self.engine.vocab_size
        bad = next((t for t in prompt if not 0 <= t < v), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt holds token id {bad}, outside the vocabulary [0, {v})", field="prompt")
        n = _int(body, "n", 1, lo=1)
        max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, lo=0)
        limit = self.engine.max_seq_len
        if limit is not None and len(prompt) + max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's {limit} tokens",
                field="max_tokens")
        temperature = _float(body, "temperature", 1.0, lo=0.0)
        top_p = _float(body, "top_p", 1.0, lo=0.0)
        if not 0 < top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", field="top_p")
        top_k = _int(body, "top_k", -1, lo=-1)
        if top_k == 0:
            top_k = -1
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidRequestError("seed must be an integer", field="seed")
        stop_raw = body.get("stop")
        stop_ids = body.get("stop_token_ids") or []
        stop_at_eos = not body.get("ignore_eos", False)
        if isinstance(stop_raw, str):
            stop = [stop_raw]
        elif stop_raw is None:
            stop = []
        elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
            stop = list(stop_raw)
            if not stop and not stop_ids:
                stop_at_eos = False  # Tinker: an explicit empty stop list disables every stop, EOS too
        elif isinstance(stop_raw, list) and all(isinstance(s, int) for s in stop_raw):
            stop, stop_ids = [], [*stop_ids, *stop_raw]
        else:
            raise InvalidRequestError("stop must be a string, a list of strings or a list of token ids", field="stop")
        if not all(isinstance(t, int) for t in stop_ids):
            raise InvalidRequestError("stop_token_ids must be token ids", field="stop_token_ids")
        plp = body.get("prompt_logprobs")
        if plp is not None and (not isinstance(plp, int) or isinstance(plp, bool) or plp < 0 or plp > 20):
            raise InvalidRequestError("prompt_logprobs must be an integer in [0, 20] or null", field="prompt_logprobs")
        return GenerationRequest(prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop, stop_token_ids=list(stop_ids),
                                 stop_at_eos=stop_at_eos, prompt_logprobs=plp)

    # ---- reads ------------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        base = {"id": self.model_name, "object": "model", "root": self.engine.base_model, "parent": None}
        ordered = ([self.live] if self.live else []) + sorted(
            (a for a in self.adapters.values() if a is not self.live), key=lambda a: -a.engine_id)
        cards = [{"id": a.name, "object": "model", "root": a.path, "parent": self.model_name,
                  "policy_version": a.policy_version} for a in ordered]
        return JSONResponse({"object": "list", "data": [base, *cards]})

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"policy_version": self.live_version})

    async def _health(self, request: Request) -> Response:
        if self.shutting_down:
            return error_response(503, "the sampler is shutting down")
        return JSONResponse({"status": "ok", "base_model": self.engine.base_model,
                             "policy_version": self.live_version})


def _int(body: dict[str, Any], key: str, default: int, *, lo: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise InvalidRequestError(f"{key} must be an integer >= {lo}, got {v!r}", field=key)
    return v


def _float(body: dict[str, Any], key: str, default: float, *, lo: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo:
        raise InvalidRequestError(f"{key} must be a number >= {lo}, got {v!r}", field=key)
    return float(v)


def _vllm_prompt_logprobs(prompt: list[int], actual: list[float | None] | None,
                          topk: list[list[tuple[int, float]] | None] | None) -> list[dict[str, Any] | None]:
    """vLLM's shape: per position, a map from token id to {logprob, rank}; None at position 0."""
    out: list[dict[str, Any] | None] = []
    for i, tok in enumerate(prompt):
        lp = actual[i] if actual else None
        if i == 0 or lp is None:
            out.append(None)
            continue
        entry: dict[str, Any] = {}
        top = (topk[i] or []) if topk else []
        for rank, (tid, tlp) in enumerate(top, start=1):
            entry[str(tid)] = {"logprob": tlp, "rank": rank}
        if str(tok) not in entry:
            # rank of the actual token: 1 + how many of the listed alternatives beat it
            entry[str(tok)] = {"logprob": lp, "rank": 1 + sum(1 for _, t in top if t > lp)}
        out.append(entry)
    return out
