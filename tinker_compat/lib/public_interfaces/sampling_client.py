"""Tinker's ``SamplingClient`` over a ``loops_core.SamplingClient``.

``sample`` and ``compute_logprobs`` return futures. Every sampled sequence carries ``sequence_id``,
``tokens``, ``logprobs`` (under the temperature-scaled distribution) and ``stop_reason``; the
response types are loops' own (``tinker.types.SampleResponse is loops_core.SampleResponse``).

Not supported (BadRequestError when asked for): ``topk_sample_logprobs``, ``target_prompt_logprobs``,
``prompt_alt_tokens_k``, ``RetryConfig`` (loops' wire client has its own retry policy).
``record_stability_info`` is accepted and kept; loops samplers keep no per-sequence record, so
``stable_reinforce`` takes the sampler's logprobs from the datums (see ``loops_core.losses``).
"""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import loops_core
from loops_core.wire import Endpoint

from ... import types
from ..._exceptions import BadRequestError, tinker_errors
from .api_future import APIFuture, deprecated_async, run


class SamplingClient:
    """Samples from one model version. Picklable (within the process for in-process samplers)."""

    def __init__(self, client: loops_core.SamplingClient, *, record_stability_info: bool = False):
        self._client = client
        self.record_stability_info = record_stability_info

    @property
    def loops_client(self) -> loops_core.SamplingClient:
        """The loops client underneath."""
        return self._client

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: types.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> APIFuture[types.SampleResponse]:
        """``num_samples`` completions of ``prompt``; prompt logprobs (and top-k alternatives) on request."""
        for name, value, unset in (("topk_sample_logprobs", topk_sample_logprobs, 0),
                                   ("target_prompt_logprobs", target_prompt_logprobs, None),
                                   ("prompt_alt_tokens_k", prompt_alt_tokens_k, 0)):
            if value is not unset and value != unset:
                raise BadRequestError(f"{name} is not supported by loops samplers", field=name)
        if prompt_logprobs_last_n is not None and not include_prompt_logprobs:
            raise BadRequestError("prompt_logprobs_last_n needs include_prompt_logprobs=True",
                                  field="prompt_logprobs_last_n")

        async def go() -> types.SampleResponse:
            out = await self._client.sample_async(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                                  topk_prompt_logprobs)
            return _last_n(out, prompt_logprobs_last_n)

        return run(APIFuture, go())

    def compute_logprobs(self, prompt: types.ModelInput,
                         prompt_logprobs_last_n: int | None = None) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given those before it (temperature 1); entry 0 is None."""
        async def go() -> list[float | None]:
            values = await self._client.compute_logprobs_async(prompt)
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

    async def get_base_model_async(self) -> str:
        warnings.warn("DEPRECATED: SamplingClient.get_base_model_async() is deprecated (as in tinker 0.38); use "
                      "get_base_model()", FutureWarning, stacklevel=2)
        return self.get_base_model()

    # ---- moving the client between processes ---------------------------------------------------
    def get_sampler_handle(self) -> str:
        """A pickle-free string naming this client's sampler and pinned version (no credentials).

        The handle is base64url JSON: ``url``, ``base_model``, ``policy_version``,
        ``min_policy_version``, ``checkpoint_path``, ``ready_timeout``. Samplers mounted in-process
        (the fake backend) have no address another process can reach: pickle the client instead.
        """
        c = self._client
        endpoint = c._endpoint
        if endpoint.transport is not None:
            raise BadRequestError("this sampler runs in-process (fake backend); it has no address another process "
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
            raise BadRequestError(f"not a sampler handle: {exc}") from None
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
    if n is None:
        return out
    update: dict[str, Any] = {}
    if out.prompt_logprobs is not None:
        update["prompt_logprobs"] = _blank_all_but_last(out.prompt_logprobs, n)
    if out.topk_prompt_logprobs is not None:
        update["topk_prompt_logprobs"] = _blank_all_but_last(out.topk_prompt_logprobs, n)
    return out.model_copy(update=update)
