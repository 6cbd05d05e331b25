"""The sampler server: vLLM's completions shape with token-id prompts, around a ``SamplerEngine``.

It serves every run of its trainer: each run's published versions, pinned per run. A request's run is
its ``X-Run-Id`` header, else the run in its ``X-Checkpoint-Path`` (``loops://<run>/...``), else the
trainer's default run. The adapters (and which of them the engine holds) are kept in ``adapters.py``.

Routes::

    POST /sample (alias /v1/completions)  {prompt: [ids], n, temperature, top_p, top_k, max_tokens,
                                           seed, stop | stop_token_ids, prompt_logprobs,
                                           topk_sample_logprobs?, target_prompt_logprobs?}
    POST /v1/load_lora_adapter            {lora_name, lora_path, policy_version?, run_id?}  (the trainer publishes)
    POST /v1/unload_lora_adapter          {lora_name}
    GET  /v1/models                       base model (parent null) + adapters (parent = base)
    GET  /trainers_policy_version, /policy_version, /health

Which weights serve a request, from its headers:

* ``X-Policy-Version: v``: exactly version ``v`` of the run (loops' own pinned clients); 410 once it is gone.
* ``X-Checkpoint-Path: p`` with ``X-Min-Policy-Version: m``: the checkpoint at ``p`` until the live
  version reaches ``m``, then the live one (the published client's ``create_sampling_client``).
  Without ``m``: the checkpoint at ``p``, loaded on demand.
* ``X-Min-Policy-Version: m`` alone: the live version, or 408 while it is below ``m``.
* nothing: the live (latest published) version; the base model before any publication.

Every answer carries ``x-trainers-policy-version``: the policy version that was served (0 = base).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..checkpoints import CheckpointStore, parse_uri
from ..engine import GenerationRequest, SamplerEngine
from ..errors import InvalidRequestError
from .adapters import Adapter, AdapterTable
from .stats import stats_route
from .incarnation import IncarnationMiddleware
from .http import find_guard, guard, error_response, guarded, json_body

DEFAULT_MAX_TOKENS = 16  # as vLLM's completions endpoint


class SamplerServer:
    def __init__(self, engine: SamplerEngine, *, store: CheckpointStore | None = None, api_key: str | None = None,
                 keep_versions: int = 4, idle_unload_s: float = 1800.0, name: str | None = None,
                 max_resident: int = 16):
        self.engine = engine
        self.store = store or CheckpointStore()
        self.table = AdapterTable(engine, self.store, keep_versions=keep_versions, idle_unload_s=idle_unload_s,
                                  max_resident=max_resident)
        self.model_name = name or engine.base_model
        self.default_run: str | None = None  # the run of requests that name none (the trainer says which)
        self.shutting_down = False
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
        self.app = IncarnationMiddleware(guard(Starlette(routes=routes), self, api_key=api_key, role="sampler"))

    # ---- adapters -------------------------------------------------------------------------
    @guarded
    async def _load(self, request: Request) -> Response:
        body = await json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise InvalidRequestError("lora_name and lora_path are required strings", field="lora_name")
        version = body.get("policy_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise InvalidRequestError("policy_version must be a positive integer", field="policy_version")
        run = body.get("run_id")
        if run is not None and not isinstance(run, str):
            raise InvalidRequestError("run_id must be a string", field="run_id")
        directory = self.store.resolve(path)
        run = run or self._run_in(path, directory)  # a caller that names no run (a replayed journal)
        if body.get("default_run"):
            self.default_run = run
        version = await self.table.publish(name, path, directory, run, version)
        return JSONResponse({"status": "ok", "lora_name": name, "policy_version": version, "run_id": run})

    @guarded
    async def _unload(self, request: Request) -> Response:
        body = await json_body(request)
        name = body.get("lora_name")
        if not await self.table.unload_named(name):
            return error_response(404, f"no adapter named {name!r} is loaded")
        return JSONResponse({"status": "ok"})

    def _run_of(self, request: Request) -> str | None:
        """The request's run: named, else in its checkpoint path, else the default run (when the
        trainer said which, or when only one run has published)."""
        named = request.headers.get("x-run-id") or request.query_params.get("run_id")
        if named:
            return named
        parsed = parse_uri(request.headers.get("x-checkpoint-path") or "")
        if parsed:
            return parsed[0]
        if self.default_run is None and len(self.table.live) == 1:
            return next(iter(self.table.live))
        return self.default_run

    def _run_in(self, path: str, directory: Any) -> str | None:
        """The run a checkpoint belongs to, from its URI or its place in the store
        (``<root>/<run>/sampler_weights/<name>``); None when it is elsewhere."""
        parsed = parse_uri(path)
        if parsed:
            return parsed[0]
        try:
            parts = directory.resolve().relative_to(self.store.root.resolve()).parts
        except (ValueError, OSError):
            return None
        return parts[0] if len(parts) == 3 and parts[1] == "sampler_weights" else None

    async def _choose(self, request: Request) -> Adapter | None | Response:
        h = request.headers
        try:
            exact = int(h["x-policy-version"]) if "x-policy-version" in h else None
            floor = int(h["x-min-policy-version"]) if "x-min-policy-version" in h else None
        except ValueError:
            raise InvalidRequestError("X-Policy-Version / X-Min-Policy-Version must be integers",
                                      field="X-Min-Policy-Version") from None
        run = self._run_of(request)
        live = self.table.live_version(run)
        path = h.get("x-checkpoint-path")
        if exact is not None:
            if exact == 0:
                return None
            adapter = self.table.versions.get((run, exact))
            if adapter is None:
                if exact > live:
                    return error_response(408, f"version {exact} of run {run!r} is not loaded yet (live: {live})")
                return error_response(410, f"policy version {exact} of run {run!r} is no longer kept by this "
                                           f"sampler (live: {live}); create a new sampling client")
            return adapter
        if path and (floor is None or live < floor):
            return await self.table.by_path(path, run, max_adhoc=find_guard(self.app).limits.max_adhoc_adapters)
        if floor is not None and live < floor:
            return error_response(408, f"sampler is at policy version {live} of run {run!r}, below the requested "
                                       f"minimum {floor}; retry shortly", headers={"Retry-After": "1"})
        return self.table.live.get(run)

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
        served = (chosen.policy_version or 0) if chosen else 0
        if chosen is None:
            result = await self.engine.generate(gen)
        else:
            chosen.last_used = time.monotonic()
            chosen.in_use += 1
            try:
                await self.table.ensure_resident(chosen)
                gen.adapter = chosen.engine_id
                result = await self.engine.generate(gen)
            finally:
                chosen.in_use -= 1
        choices = []
        for i, s in enumerate(result.sequences):
            logprobs: dict[str, Any] = {"tokens": [f"token_id:{t}" for t in s.tokens], "token_logprobs": s.logprobs}
            if s.topk is not None:
                logprobs["topk_logprobs"] = [[[t, lp] for t, lp in top] for top in s.topk]
            choices.append({
                "index": i, "text": s.text, "token_ids": s.tokens, "finish_reason": s.finish_reason,
                "sequence_id": uuid.uuid4().hex, "logprobs": logprobs,
                **({"topk_logprobs": logprobs["topk_logprobs"]} if s.topk is not None else {})})
        out: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                               "model": chosen.name if chosen else self.model_name, "choices": choices,
                               "prompt_token_ids": gen.prompt,
                               "usage": {"prompt_tokens": len(gen.prompt),
                                         "completion_tokens": sum(len(s.tokens) for s in result.sequences)},
                               "prompt_cache_hit_tokens": result.prompt_cache_hit_tokens}
        if result.target_prompt_logprobs is not None:
            out["target_prompt_logprobs"] = result.target_prompt_logprobs
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
        topk_sample = _int(body, "topk_sample_logprobs", 0, lo=0)
        if topk_sample > 20:
            raise InvalidRequestError("topk_sample_logprobs must be in [0, 20]", field="topk_sample_logprobs")
        return GenerationRequest(prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop, stop_token_ids=list(stop_ids),
                                 stop_at_eos=stop_at_eos, prompt_logprobs=plp, topk_sample_logprobs=topk_sample,
                                 target_prompt_tokens=_target_tokens(body.get("target_prompt_logprobs"), prompt, v))

    # ---- reads ------------------------------------------------------------------------------
    async def _models(self, request: Request) -> Response:
        """The base model, then the request's run's adapters (its live one first), then the other runs'."""
        run = self._run_of(request)
        base = {"id": self.model_name, "object": "model", "root": self.engine.base_model, "parent": None}
        live = self.table.live.get(run)
        ordered = ([live] if live else []) + sorted(
            (a for a in self.table.adapters.values() if a is not live), key=lambda a: (a.run_id != run, -a.engine_id))
        cards = [{"id": a.name, "object": "model", "root": a.path, "parent": self.model_name,
                  "policy_version": a.policy_version, "run_id": a.run_id} for a in ordered]
        return JSONResponse({"object": "list", "data": [base, *cards]})

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"policy_version": self._version_for(request)})

    def _version_for(self, request: Request) -> int:
        """The live version of the request's run. A request that names no run while several runs
        publish (an older client) gets the highest of them: that can only end its wait early, and the
        pinned request that follows names its run through its checkpoint path."""
        live = self.table.live
        if request.headers.get("x-run-id") or request.query_params.get("run_id") or not live:
            return self.table.live_version(self._run_of(request))
        return max(self.table.live_version(r) for r in live)

    async def _health(self, request: Request) -> Response:
        if self.shutting_down:
            return error_response(503, "the sampler is shutting down")
        return JSONResponse({"status": "ok", "base_model": self.engine.base_model,
                             "policy_version": self._version_for(request), "runs": len(self.table.live),
                             "adapters": len(self.table.adapters), "resident": len(self.table.resident)})


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


def _target_tokens(raw: Any, prompt: list[int], vocab: int) -> list[list[int]] | None:
    """``target_prompt_logprobs`` as sent (TensorData-like: ``{data, shape}``, or a nested list): an
    int [len(prompt) - 1, K] table of ids, -1 for none."""
    if raw is None:
        return None
    field = "target_prompt_logprobs"
    if isinstance(raw, dict):
        data, shape = raw.get("data"), raw.get("shape")
        if not isinstance(data, list) or not isinstance(shape, list) or len(shape) != 2 \
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in [*shape, *data]) \
                or shape[0] * shape[1] != len(data):
            raise InvalidRequestError(f"{field} must be int64 TensorData of shape [len(prompt) - 1, K]", field=field)
        rows = [data[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
    elif isinstance(raw, list) and all(isinstance(r, list) for r in raw):
        rows = raw
    else:
        raise InvalidRequestError(f"{field} must be int64 TensorData of shape [len(prompt) - 1, K]", field=field)
    if len(rows) != len(prompt) - 1 or len({len(r) for r in rows}) > 1:
        raise InvalidRequestError(f"{field} must have len(prompt) - 1 = {len(prompt) - 1} rows of equal length",
                                  field=field)
    if not all(isinstance(t, int) and not isinstance(t, bool) and -1 <= t < vocab for r in rows for t in r):
        raise InvalidRequestError(f"{field} holds a token id outside [-1, {vocab})", field=field)
    return [list(r) for r in rows]
