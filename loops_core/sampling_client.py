"""SamplingClient: completions from a sampler, pinned to exactly the weights it was made for.

Two kinds, one class:

* **pinned** (from ``TrainingClient.save_weights_and_get_sampling_client``): every request carries
  ``X-Policy-Version`` (and ``X-Min-Policy-Version`` for published-protocol samplers), so it samples
  exactly its version even after newer ones are published;
* **following** (from ``ServiceClient.create_sampling_client``): serves whatever the sampler holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from typing import Any

from .errors import APIStatusError, APITimeoutError, InvalidRequestError
from .futures import ClientLifecycle, on_loop, run_sync, twin
from .retry import READINESS, SAMPLE, SAMPLE_QUEUED
from .tokenizers import load_tokenizer
from .types import ModelInput, SampledSequence, SampleResponse, SamplingParams
from .wire import Endpoint, WireClient, accepted_operation_id

# In-process transports cannot be pickled; a pickled client refers to them by key instead.
_TRANSPORTS: dict[int, Any] = {}
_keys = itertools.count(1)


class SamplingClient(ClientLifecycle):
    def __init__(self, sampler: Endpoint | str, *, base_model: str, policy_version: int | None = None,
                 min_policy_version: int | None = None, checkpoint_path: str | None = None,
                 timeout: float | None = None, ready_timeout: float = 3600.0, tokenizer_id: str | None = None,
                 run_id: str | None = None, sampler_id: str | None = None, tokenizer_loader: Any = None):
        if isinstance(sampler, str):
            sampler = Endpoint(url=sampler)
        self._endpoint = sampler
        self._base_model = base_model
        self.policy_version = policy_version or None
        self.min_policy_version = min_policy_version or None
        self.checkpoint_path = checkpoint_path
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.run_id = run_id
        self.sampler_id = sampler_id
        self._tokenizer_id = tokenizer_id
        self._tokenizer_loader = tokenizer_loader
        headers: dict[str, str] = {}
        if self.policy_version:
            headers["X-Policy-Version"] = str(self.policy_version)
        if self.min_policy_version:
            headers["X-Min-Policy-Version"] = str(self.min_policy_version)
        if checkpoint_path:
            headers["X-Checkpoint-Path"] = checkpoint_path
        self._wire = WireClient(sampler, timeout=timeout or 600.0, ready_timeout=ready_timeout,
                                extra_headers=headers)

    # ---- sampling -----------------------------------------------------------------------------
    @twin
    async def sample(self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None,
                     include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
                     topk_sample_logprobs: int = 0,
                     target_prompt_logprobs: list[list[int]] | None = None) -> SampleResponse:
        """Generate ``num_samples`` completions of ``prompt``.

        ``topk_sample_logprobs=k`` also returns, per sampled token, the k most likely tokens
        (``SampledSequence.topk_logprobs``). ``target_prompt_logprobs`` is a ``[len(prompt) - 1, K]``
        table of token ids (-1 for none): row i is scored at prompt position i + 1, and
        ``SampleResponse.target_prompt_logprobs`` returns their logprobs in the same layout.
        """
        if not isinstance(topk_sample_logprobs, int) or isinstance(topk_sample_logprobs, bool) \
                or not 0 <= topk_sample_logprobs <= 20:
            raise InvalidRequestError("topk_sample_logprobs must be an integer in [0, 20]",
                                      field="topk_sample_logprobs")
        extra: dict[str, Any] = {}
        if topk_sample_logprobs:
            extra["topk_sample_logprobs"] = topk_sample_logprobs
        if target_prompt_logprobs is not None:
            extra["target_prompt_logprobs"] = _target_ids(target_prompt_logprobs, prompt)
        return await self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                  topk_prompt_logprobs, extra)

    @twin
    async def compute_logprobs(self, prompt: ModelInput) -> list[float | None]:
        """Logprob of each prompt token given the ones before it; index 0 is None."""
        # max_tokens=1 as the published client sends it: some samplers refuse 0
        r = await self._sample(prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), True, 0)
        return list(r.prompt_logprobs or [])

    async def _sample(self, prompt: ModelInput, num_samples: int, params: SamplingParams | None,
                      include_prompt_logprobs: bool, topk: int, extra: dict[str, Any] | None = None) -> SampleResponse:
        body = {**self._body(prompt, num_samples, params, include_prompt_logprobs, topk), **(extra or {})}
        queued = self._endpoint.queued
        if queued:  # the queue needs the model; a dedicated sampler may know it by another name
            body["model"] = self._base_model
            if self.checkpoint_path:
                body["lora"] = self.checkpoint_path
        r = await self._wire.request("POST", "/sample", what="sample", json=body,
                                     policy=SAMPLE_QUEUED if queued else SAMPLE, accept=frozenset({202}),
                                     headers={"Idempotency-Key": str(uuid.uuid4())})
        if queued != (r.status_code == 202):
            raise APIStatusError(f"sample: {'expected' if queued else 'unexpected'} 202 from {self._endpoint.url}"
                                 f"/sample (HTTP {r.status_code})", status_code=r.status_code)
        if not queued:
            return parse_sample_response(r.json(), r.headers.get("x-trainers-policy-version"), body["prompt"], topk)
        return parse_sample_response(await self._await_queued(accepted_operation_id(r, "sample")), None,
                                     body["prompt"], topk)

    async def _await_queued(self, op_id: str) -> dict[str, Any]:
        """The result of a queued sample; one nobody waits for any more is cancelled."""
        try:
            return await asyncio.wait_for(self._wire.poll(op_id, what="sample"), self.timeout)
        except asyncio.TimeoutError:
            await self._wire.cancel(op_id)
            raise APITimeoutError(f"sample: no result within {self.timeout} s (operation {op_id} cancelled)") \
                from None
        except asyncio.CancelledError:
            await asyncio.shield(self._wire.cancel(op_id))
            raise

    def _body(self, prompt: ModelInput, n: int, params: SamplingParams | None, include: bool,
              topk: int) -> dict[str, Any]:
        if not isinstance(prompt, ModelInput):
            raise InvalidRequestError("prompt must be a ModelInput (e.g. ModelInput.from_ints(ids))", field="prompt")
        if not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"num_samples must be a positive integer, got {n!r}", field="num_samples")
        if not isinstance(topk, int) or not 0 <= topk <= 20:
            raise InvalidRequestError("topk_prompt_logprobs must be in [0, 20]", field="topk_prompt_logprobs")
        if topk and not include:
            include = True  # top-k alternatives come with the prompt logprobs
        p = params or SamplingParams()
        body: dict[str, Any] = {"prompt": prompt.to_ints(), "n": n, "temperature": p.temperature,
                                "top_p": p.top_p, "logprobs": 0, "return_tokens_as_token_ids": True}
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        if p.seed is not None:
            body["seed"] = p.seed
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if isinstance(p.stop, list) and p.stop and all(isinstance(s, int) for s in p.stop):
            body["stop_token_ids"] = p.stop
        elif p.stop is not None:
            body["stop"] = p.stop
        if include:
            body["prompt_logprobs"] = topk
        return body

    # ---- discovery ----------------------------------------------------------------------------
    def discover_base_model_name(self) -> str:
        """The base model id from ``/v1/models`` (the entry with no parent)."""
        data = run_sync(self._wire.get_json("/v1/models", what="list models"))
        for card in data.get("data", []):
            if card.get("parent") is None:
                return card["id"]
        raise APIStatusError("the sampler lists no base model", status_code=200)

    def discover_adapter_name(self) -> str | None:
        """The live adapter id (first ``/v1/models`` entry with a parent), or None."""
        data = run_sync(self._wire.get_json("/v1/models", what="list models"))
        return next((c["id"] for c in data.get("data", []) if c.get("parent") is not None), None)

    @property
    def endpoint(self) -> Endpoint:
        """Where this client's sampler is (its URL; in-process servers carry their transport)."""
        return self._endpoint

    def get_base_model(self) -> str:
        return self._base_model

    def get_tokenizer(self) -> Any:
        tid = self._tokenizer_id or self._base_model
        return (self._tokenizer_loader or load_tokenizer)(tid)

    @twin
    async def ensure_ready(self, ready_timeout: float | None = None) -> None:
        """Wait until the sampler answers ``/health`` (at most ``ready_timeout`` seconds)."""
        await self._wire.request("GET", "/health", what="sampler health", policy=READINESS, timeout=10.0,
                                 budget=ready_timeout or self.ready_timeout)

    @classmethod
    def ensure_ready_for_deployment(cls, *, base_model: str, deployment: Endpoint | str, api_key: str | None = None,
                                    ready_timeout: float = 3600.0) -> None:
        """Wait for a sampler deployment with a throwaway client."""
        if isinstance(deployment, str):
            deployment = Endpoint(url=deployment, api_key=api_key)
        client = cls(deployment, base_model=base_model, ready_timeout=ready_timeout)
        try:
            client.ensure_ready(ready_timeout)
        finally:
            client.close()

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        run_sync(self._wire.aclose())

    async def aclose(self) -> None:
        await on_loop(self._wire.aclose())

    def __getstate__(self) -> dict[str, Any]:
        # the wire client and a backend's tokenizer loader stay behind; both are rebuilt on load
        state = {k: v for k, v in self.__dict__.items() if k not in ("_wire", "_tokenizer_loader")}
        ep = self._endpoint
        if ep.transport is not None:
            key = next(_keys)
            _TRANSPORTS[key] = ep.transport
            state["_transport_key"] = key
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        key = state.pop("_transport_key", None)
        ep: Endpoint = state["_endpoint"]
        if key is not None:
            if key not in _TRANSPORTS:
                raise RuntimeError("this SamplingClient talks to an in-process sampler and cannot move to "
                                   "another process")
            ep = dataclasses.replace(ep, transport=_TRANSPORTS[key])
        self.__init__(ep, base_model=state["_base_model"], policy_version=state["policy_version"],  # type: ignore[misc]
                      min_policy_version=state["min_policy_version"], checkpoint_path=state["checkpoint_path"],
                      timeout=state["timeout"], ready_timeout=state["ready_timeout"],
                      tokenizer_id=state["_tokenizer_id"], run_id=state["run_id"], sampler_id=state["sampler_id"],
                      tokenizer_loader=None)

    def __repr__(self) -> str:
        pin = f" version={self.policy_version}" if self.policy_version else ""
        return f"<SamplingClient {self._base_model}{pin} @ {self._endpoint.url}>"


def _target_ids(table: Any, prompt: ModelInput) -> list[list[int]]:
    n = prompt.length - 1 if isinstance(prompt, ModelInput) else -1
    rows = table.tolist() if hasattr(table, "tolist") else table
    if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, list) for r in rows) \
            or len({len(r) for r in rows}) > 1 \
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= -1 for r in rows for t in r):
        raise InvalidRequestError(f"target_prompt_logprobs must be {n} rows (len(prompt) - 1) of equal length "
                                  "holding token ids, -1 for none", field="target_prompt_logprobs")
    return rows


def parse_sample_response(data: dict[str, Any], version_header: str | None, prompt: list[int],
                          topk: int) -> SampleResponse:
    """The completions JSON (ours or vLLM's) as a SampleResponse."""
    seqs = []
    for choice in data.get("choices", []):
        lp = choice.get("logprobs") or {}
        tokens = choice.get("token_ids")
        if tokens is None:
            tokens = [int(str(t).split(":", 1)[1]) for t in lp.get("tokens", [])]
        logprobs = lp.get("token_logprobs")
        if tokens[:len(prompt)] == prompt and len(tokens) > len(prompt) and choice.get("token_ids") is None:
            tokens, logprobs = tokens[len(prompt):], (logprobs or [])[len(prompt):]
        topk_sampled = choice.get("topk_logprobs", lp.get("topk_logprobs"))
        seqs.append(SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=choice.get("finish_reason") or "length",
                                    text=choice.get("text"), sequence_id=choice.get("sequence_id") or uuid.uuid4().hex,
                                    topk_logprobs=None if topk_sampled is None else
                                    [[(int(t), float(v)) for t, v in row] for row in topk_sampled]))
    plp_raw = data.get("prompt_logprobs")
    if plp_raw is None and data.get("choices"):
        plp_raw = data["choices"][0].get("prompt_logprobs")
    prompt_lp: list[float | None] | None = None
    topk_lp: list[list[tuple[int, float]] | None] | None = None
    if plp_raw is not None:
        prompt_lp, topk_lp = [], []
        for tok, entry in zip(prompt, plp_raw):
            if not entry:
                prompt_lp.append(None)
                topk_lp.append(None)
                continue
            own = entry.get(str(tok))
            prompt_lp.append(own["logprob"] if own else None)
            ranked = sorted(((int(t), e) for t, e in entry.items() if e.get("rank", 10**9) <= topk),
                            key=lambda x: x[1]["rank"])
            topk_lp.append([(t, e["logprob"]) for t, e in ranked])
    version = int(version_header) if version_header not in (None, "") else None
    return SampleResponse(sequences=seqs, policy_version=version, prompt_token_ids=prompt,
                          prompt_logprobs=prompt_lp, topk_prompt_logprobs=topk_lp if topk else None,
                          target_prompt_logprobs=data.get("target_prompt_logprobs"),
                          prompt_cache_hit_tokens=int(data.get("prompt_cache_hit_tokens") or 0))
