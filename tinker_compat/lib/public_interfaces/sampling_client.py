"""Tinker's ``SamplingClient`` over a ``loops_core.SamplingClient``.

``sample`` and ``compute_logprobs`` return futures. Every sampled sequence carries ``sequence_id``,
``tokens``, ``logprobs`` (under the temperature-scaled distribution) and ``stop_reason``; the
prompt goes to loops and the response comes back as Tinker's frozen dataclasses through
``tinker._convert`` (``prompt_cache_hit_tokens``, ``topk_logprobs``, ``target_prompt_logprobs``
as the loops sampler reports them).

``topk_sample_logprobs`` and ``target_prompt_logprobs`` are forwarded to the loops sampling client
when it takes them (``BadRequestError`` naming the parameter otherwise). Not supported:
``prompt_alt_tokens_k``, ``RetryConfig`` (loops' wire client has its own retry policy).
``record_stability_info`` is accepted and kept; loops samplers keep no per-sequence record, so
``stable_reinforce`` takes the sampler's logprobs from the datums (see ``loops_core.losses``).
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import warnings
from typing import Any

import loops_core
from loops_core.wire import Endpoint

from ... import _convert as convert
from ... import types
from ..._exceptions import bad_request, tinker_errors
from ...types._sample_response import MASK_LOGPROB, TopkLogprobs
from .api_future import APIFuture, AwaitableConcurrentFuture, deprecated_async, run  # noqa: F401


class SamplingClient:
    """Samples from one model version. Picklable (within the process for in-process samplers)."""

    def __init__(self, client: loops_core.SamplingClient, *, record_stability_info: bool = False):
        self._client = client
        self.record_stability_info = record_stability_info

    @staticmethod
    def create(holder: Any, *, model_path: str | None = None, base_model: str | None = None,
               sampling_session_id: str | None = None, retry_config: Any = None,
               record_stability_info: bool = False) -> APIFuture["SamplingClient"]:
        """A sampling client from a ``tinker.ServiceClient`` (``holder``); sampling session ids are Tinker's own."""
        if sampling_session_id is not None:
            raise bad_request("sampling_session_id names a Tinker sampling session; loops has none — pass "
                              "model_path or base_model", "sampling_session_id")
        return holder.create_sampling_client(model_path=model_path, base_model=base_model,
                                             record_stability_info=record_stability_info)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: types.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> APIFuture[types.SampleResponse]:
        """``num_samples`` completions of ``prompt``; prompt logprobs (and top-k alternatives) on request."""
        if prompt_alt_tokens_k:
            raise bad_request("prompt_alt_tokens_k is not supported by loops samplers", "prompt_alt_tokens_k")
        if prompt_logprobs_last_n is not None and not include_prompt_logprobs:
            raise bad_request("prompt_logprobs_last_n needs include_prompt_logprobs=True", "prompt_logprobs_last_n")
        extra: dict[str, Any] = {}
        if topk_sample_logprobs:
            extra["topk_sample_logprobs"] = topk_sample_logprobs
        if target_prompt_logprobs is not None:
            extra["target_prompt_logprobs"] = convert.to_loops_target_ids(target_prompt_logprobs)
        accepted = inspect.signature(self._client.sample_async).parameters
        for name in extra:
            if name not in accepted:
                raise bad_request(f"{name}: this loops_core SamplingClient does not take it yet (loops samplers "
                                  "compute it once the client forwards it)", name)
        loops_prompt = convert.to_loops_model_input(prompt)
        loops_params = convert.to_loops_sampling_params(sampling_params)

        async def go() -> types.SampleResponse:
            out = await self._client.sample_async(loops_prompt, num_samples, loops_params, include_prompt_logprobs,
                                                  topk_prompt_logprobs, **extra)
            return _last_n(convert.from_loops_sample(out), prompt_logprobs_last_n)

        return run(APIFuture, go())

    def compute_logprobs(self, prompt: types.ModelInput,
                         prompt_logprobs_last_n: int | None = None) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given those before it (temperature 1); entry 0 is None."""
        async def go() -> list[float | None]:
            values = convert.from_loops_logprobs(
                await self._client.compute_logprobs_async(convert.to_loops_model_input(prompt)))
            if prompt_logprobs_last_n is not None:
                values = _blank_all_but_last(values, prompt_logprobs_last_n)
            return values

        return run(APIFuture, go())

    sample_async = deprecated_async(sample, returns_future=False)
    compute_logprobs_async = deprecated_async(compute_logprobs, returns_future=False)

    def get_tokenizer(self) -> Any:
        with tinker_errors():
            return self._client.get_tokenizer()

    def get_base_model(self) -> str:
        return self._client.get_base_model()

    def get_base_model_async(self) -> Any:
        """Deprecated (as in tinker 0.38): use ``get_base_model()``."""
        warnings.warn("DEPRECATED: SamplingClient.get_base_model_async() is deprecated (as in tinker 0.38); use "
                      "get_base_model()", FutureWarning, stacklevel=2)

        async def finish() -> str:
            return self.get_base_model()

        return finish()

    def get_telemetry(self) -> None:
        """loops sends no telemetry."""
        return None

    def on_queue_state_change(self, queue_state: Any, queue_state_reason: str | None) -> None:
        """Tinker's queue-state hook; loops samplers have no shared queue to report, so it is never called."""

    # ---- moving the client between processes ---------------------------------------------------
    def get_sampler_handle(self) -> str:
        """A pickle-free string naming this client's sampler and pinned version (no credentials).

        The handle is base64url JSON: ``url``, ``base_model``, ``policy_version``,
        ``min_policy_version``, ``checkpoint_path``, ``ready_timeout``. Samplers mounted in-process
        (the fake backend) have no address another process can reach: pickle the client instead.
        """
        c = self._client
        endpoint = c.endpoint
        if endpoint.transport is not None:
            raise bad_request("this sampler runs in-process (fake backend); it has no address another process "
                              "can reach. Pickle the SamplingClient within this process instead.")
        state = {"url": endpoint.url, "base_model": c.get_base_model(), "policy_version": c.policy_version,
                 "min_policy_version": c.min_policy_version, "checkpoint_path": c.checkpoint_path,
                 "ready_timeout": c.ready_timeout, "record_stability_info": self.record_stability_info}
        return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> "SamplingClient":
        """A new client for the sampler behind ``handle`` (from ``get_sampler_handle``)."""
        try:
            state = json.loads(base64.urlsafe_b64decode(handle))
            endpoint = Endpoint(url=state["url"], api_key=api_key)
        except (ValueError, KeyError, TypeError) as exc:
            raise bad_request(f"not a sampler handle: {exc}", "handle") from None
        client = loops_core.SamplingClient(
            endpoint, base_model=state["base_model"], policy_version=state.get("policy_version"),
            min_policy_version=state.get("min_policy_version"), checkpoint_path=state.get("checkpoint_path"),
            ready_timeout=float(state.get("ready_timeout") or 3600.0))
        return SamplingClient(client, record_stability_info=bool(state.get("record_stability_info")))

    def __repr__(self) -> str:
        return f"<tinker.SamplingClient over {self._client!r}>"


def _blank_all_but_last(values: list[Any], n: int) -> list[Any]:
    keep = max(len(values) - n, 0) if n >= 0 else 0
    return [None] * keep + list(values[keep:])


def _last_n(out: types.SampleResponse, n: int | None) -> types.SampleResponse:
    """Prompt logprobs kept for the last ``n`` positions only (NaN / None before them)."""
    if n is None:
        return out
    keep = max(len(out.prompt_logprobs or ()) - n, 0) if n >= 0 else 0
    prompt_np = None if out.prompt_logprobs_np is None else out.prompt_logprobs_np.copy()
    if prompt_np is not None:
        prompt_np[:keep] = float("nan")
    topk = out.topk_prompt_logprobs_np
    if topk is not None:
        ids, lps = topk.token_ids.copy(), topk.logprobs.copy()
        ids[:keep], lps[:keep] = 0, MASK_LOGPROB
        topk = TopkLogprobs(token_ids=ids, logprobs=lps)
    return dataclasses.replace(out, prompt_logprobs_np=prompt_np, topk_prompt_logprobs_np=topk)
