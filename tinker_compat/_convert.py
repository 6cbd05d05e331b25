"""The one boundary between Tinker's types and loops' types.

Calls going out to loops take loops types (``to_loops_*``); results coming back are rebuilt as
Tinker's (``from_loops_*``). Nothing else in the shim converts. Fields loops samplers may not
send yet (``prompt_cache_hit_tokens``, per-sequence ``topk_logprobs``, ``target_prompt_logprobs``)
are read with a default, so an older sampler gives Tinker's "not requested" values (0 / None).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

import loops_core.types as lt
from loops_core.checkpoints import parse_uri

from . import types as tt
from ._exceptions import bad_request
from .types._sample_response import topk_from_lists


# ---- Tinker → loops (requests) ------------------------------------------------------------------
def to_loops_tensor(t: tt.TensorData) -> lt.TensorData:
    return lt.TensorData(data=t.data, dtype=t.dtype, shape=t.shape if t.shape is not None else list(t._numpy.shape),
                         sparse_crow_indices=t.sparse_crow_indices, sparse_col_indices=t.sparse_col_indices)


def to_loops_model_input(model_input: tt.ModelInput) -> lt.ModelInput:
    if not isinstance(model_input, tt.ModelInput):
        raise bad_request(f"expected a tinker.ModelInput, got {type(model_input).__name__}", "model_input")
    chunks: list[Any] = []
    for chunk in model_input.chunks:
        if isinstance(chunk, tt.EncodedTextChunk):
            chunks.append(lt.EncodedTextChunk(tokens=list(chunk.tokens)))
        elif isinstance(chunk, tt.ImageChunk):
            if not chunk.expected_tokens:
                raise bad_request("loops engines need ImageChunk.expected_tokens (the image's token count)",
                                  "expected_tokens")
            chunks.append(lt.ImageChunk(data=chunk.data, format=chunk.format, expected_tokens=chunk.expected_tokens))
        else:
            raise bad_request(f"{type(chunk).__name__} is not supported by loops backends (they take token and "
                              "inline image chunks); send the image bytes as an ImageChunk", "chunks")
    return lt.ModelInput(chunks=chunks)


def _to_loops_spans(spans: Iterable[Any] | None) -> list[Any] | None:
    if spans is None:
        return None
    return [(lt.PromptProvenanceSpan if isinstance(s, tt.PromptProvenanceSpan) else lt.SampledProvenanceSpan)(
        sequence_id=s.sequence_id, offset=s.offset, length=s.length) for s in spans]


def to_loops_datum(datum: tt.Datum) -> lt.Datum:
    if not isinstance(datum, tt.Datum):
        raise bad_request(f"expected a tinker.Datum, got {type(datum).__name__}", "data")
    return lt.Datum(model_input=to_loops_model_input(datum.model_input),
                    loss_fn_inputs={k: to_loops_tensor(v) for k, v in datum.loss_fn_inputs.items()},
                    model_input_spans=_to_loops_spans(datum.model_input_spans),
                    loss_fn_input_spans=_to_loops_spans(datum.loss_fn_input_spans))


def to_loops_data(data: Iterable[tt.Datum]) -> list[lt.Datum]:
    return [to_loops_datum(d) for d in data]


def to_loops_sampling_params(params: tt.SamplingParams) -> lt.SamplingParams:
    if not isinstance(params, tt.SamplingParams):
        raise bad_request(f"expected tinker.SamplingParams, got {type(params).__name__}", "sampling_params")
    stop = params.stop if params.stop is None or isinstance(params.stop, str) else list(params.stop)
    return lt.SamplingParams(max_tokens=params.max_tokens, seed=params.seed, stop=stop,
                             temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def to_loops_adam(params: tt.AdamParams) -> lt.AdamParams:
    # Both mean "no clipping" by grad_clip_norm=0.0; loops' own default (1.0) never applies here.
    return lt.AdamParams(**params.model_dump())


def to_loops_target_ids(targets: tt.TensorData) -> list[list[int]]:
    """Tinker's ``target_prompt_logprobs`` request ids as loops' dense ``[len(prompt) - 1, K]`` (-1 = none)."""
    array = targets.to_numpy(pad_value=-1)
    if array.ndim == 1:
        array = array[:, None]
    return array.astype(np.int64).tolist()


# ---- loops → Tinker (results) -------------------------------------------------------------------
def from_loops_tensor(t: lt.TensorData) -> tt.TensorData:
    dtype = "int64" if t.dtype in ("int64", "int32", "int8", "bool") else "float32"
    data = [math.nan if v is None else v for v in t.data] if dtype == "float32" else t.data
    return tt.TensorData(data=data, dtype=dtype, shape=t.shape, sparse_crow_indices=t.sparse_crow_indices,
                         sparse_col_indices=t.sparse_col_indices)


def from_loops_forward_backward(out: lt.ForwardBackwardOutput) -> tt.ForwardBackwardOutput:
    return tt.ForwardBackwardOutput(
        loss_fn_output_type=out.loss_fn_output_type,
        loss_fn_outputs=[{k: from_loops_tensor(v) for k, v in row.items()} for row in out.loss_fn_outputs],
        metrics=dict(out.metrics))


def from_loops_optim_step(out: lt.OptimStepResponse) -> tt.OptimStepResponse:
    return tt.OptimStepResponse(metrics=out.metrics)


def from_loops_sequence(seq: lt.SampledSequence) -> tt.SampledSequence:
    topk = getattr(seq, "topk_logprobs", None)
    return tt.SampledSequence(
        stop_reason=seq.stop_reason, sequence_id=seq.sequence_id or "",
        tokens_np=np.asarray(seq.tokens, dtype=np.int32),
        logprobs_np=None if seq.logprobs is None else np.asarray(seq.logprobs, dtype=np.float32),
        topk_logprobs_np=None if topk is None else topk_from_lists(topk))


def from_loops_sample(out: lt.SampleResponse) -> tt.SampleResponse:
    prompt_lp = out.prompt_logprobs
    topk_prompt = out.topk_prompt_logprobs
    targets = getattr(out, "target_prompt_logprobs", None)
    return tt.SampleResponse(
        sequences=[from_loops_sequence(s) for s in out.sequences],
        prompt_logprobs_np=None if prompt_lp is None else
        np.asarray([math.nan if v is None else v for v in prompt_lp], dtype=np.float32),
        topk_prompt_logprobs_np=None if topk_prompt is None else topk_from_lists(topk_prompt),
        target_prompt_logprobs=None if targets is None else
        tt.TensorData.from_numpy(np.asarray(targets, dtype=np.float32)),
        prompt_cache_hit_tokens=int(getattr(out, "prompt_cache_hit_tokens", 0) or 0))


def from_loops_logprobs(values: list[float | None]) -> list[float | None]:
    """Prompt logprobs as ``SampleResponse.prompt_logprobs`` gives them (float32 values, None where absent)."""
    array = np.asarray([math.nan if v is None else v for v in values], dtype=np.float32)
    return [None if math.isnan(v) else v for v in array.tolist()]


def from_loops_info(info: lt.GetInfoResponse, model_id: str) -> tt.GetInfoResponse:
    return tt.GetInfoResponse(
        model_id=model_id, model_name=info.model_name, is_lora=info.is_lora, lora_rank=info.lora_rank,
        model_data=tt.ModelData(arch=info.model_data.arch, model_name=info.model_data.model_name,
                                tokenizer_id=info.model_data.tokenizer_id))


def from_loops_capabilities(caps: lt.ServerCapabilities) -> tt.GetServerCapabilitiesResponse:
    return tt.GetServerCapabilitiesResponse(supported_models=[
        tt.SupportedModel(model_name=m.model_name, max_context_length=m.max_context_length, trainable=True,
                          sampleable=True) for m in caps.supported_models])


def from_loops_path(path: str | None) -> str | None:
    """``loops://run/kind/name`` (or ``bt://loops:...``) as ``tinker://run/kind/name``; others unchanged."""
    parsed = parse_uri(path) if path else None
    return f"tinker://{parsed[0]}/{parsed[1]}/{parsed[2]}" if parsed else path
