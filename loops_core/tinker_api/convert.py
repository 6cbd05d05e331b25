"""Tinker's wire bodies ↔ loops' own types.

Requests: the protobuf ``ForwardBackwardRequest`` (optionally zstd) becomes loops ``Datum``s; the
JSON ``SampleRequest`` becomes a loops ``ModelInput`` and ``SamplingParams``. Results: loops'
``ForwardBackwardOutput`` and ``SampleResponse`` become the protobuf messages the SDK reads.
Anything malformed raises ``InvalidRequestError`` naming the field, which the app answers with 400.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import InvalidRequestError
from ..types import Datum, ForwardBackwardOutput, ModelInput, SampleResponse, SamplingParams, TensorData
from . import proto

_NUMPY_OF_DTYPE = {proto.DTYPE_FLOAT32: (np.float32, "float32"), proto.DTYPE_INT64: (np.int64, "int64"),
                   proto.DTYPE_INT32: (np.int32, "int64")}
MAX_BODY = 512 * 1024 * 1024  # decompressed bytes; the SDK's chunks are ~5 MB


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    if not content_encoding or content_encoding.lower() == "identity":
        return body
    if content_encoding.lower() != "zstd":
        raise InvalidRequestError(f"Content-Encoding {content_encoding!r} is not supported (send zstd or none)",
                                  field="Content-Encoding")
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY)
    except zstandard.ZstdError as exc:
        raise InvalidRequestError(f"the body is not valid zstd: {exc}", field="body") from None


def parse_forward_backward(body: bytes) -> Any:
    msg = proto.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise InvalidRequestError(f"the body is not a ForwardBackwardRequest protobuf: {exc}", field="body") from None
    if not msg.model_id:
        raise InvalidRequestError("ForwardBackwardRequest.model_id is empty", field="model_id")
    return msg


def loss_fn_config(msg: Any) -> dict[str, float | str] | None:
    """v2 (numbers and strings) wins over the legacy float map, as on Tinker's servers."""
    out: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        out[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    return out or None


def datums(msg: Any) -> list[Datum]:
    out = []
    for i, d in enumerate(msg.data):
        where = f"data[{i}]"
        tokens: list[int] = []
        for j, chunk in enumerate(d.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise InvalidRequestError(f"{where}.model_input[{j}] is a {kind or 'empty'} chunk; loops trains on "
                                          "token chunks only", field=f"{where}.model_input")
            tokens.extend(_frombuffer(chunk.encoded_text.tokens, np.int32, f"{where}.model_input[{j}].tokens").tolist())
        inputs = {name: tensor(t, f"{where}.loss_fn_inputs[{name!r}]") for name, t in d.loss_fn_inputs.items()}
        fields: dict[str, Any] = {"model_input": ModelInput.from_ints(tokens), "loss_fn_inputs": inputs}
        if len(d.model_input_spans) or len(d.loss_fn_input_spans):
            fields["model_input_spans"] = [_span(s) for s in d.model_input_spans]
            fields["loss_fn_input_spans"] = [_span(s) for s in d.loss_fn_input_spans]
        try:
            out.append(Datum.model_validate(fields))
        except ValueError as exc:
            raise InvalidRequestError(f"{where}: {exc}", field=where) from None
    return out


def tensor(t: Any, where: str) -> TensorData:
    if t.dtype not in _NUMPY_OF_DTYPE:
        raise InvalidRequestError(f"{where}.dtype {t.dtype} is not float32, int64 or int32", field=where)
    np_dtype, name = _NUMPY_OF_DTYPE[t.dtype]
    shape = list(t.shape) or None
    try:
        if t.WhichOneof("encoding") == "sparse_csr":
            csr = t.sparse_csr
            return TensorData(data=_frombuffer(csr.values, np_dtype, where).tolist(), dtype=name, shape=shape,
                              sparse_crow_indices=_frombuffer(csr.crow_indices, np.int64, where).tolist(),
                              sparse_col_indices=_frombuffer(csr.col_indices, np.int64, where).tolist())
        return TensorData(data=_frombuffer(t.dense, np_dtype, where).tolist(), dtype=name, shape=shape)
    except ValueError as exc:
        raise InvalidRequestError(f"{where}: {exc}", field=where) from None


def _frombuffer(raw: bytes, dtype: Any, where: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise InvalidRequestError(f"{where}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values",
                                  field=where)
    return np.frombuffer(raw, dtype=dtype)


def _span(s: Any) -> dict[str, Any]:
    kind = s.WhichOneof("span")
    arm = s.prompt_tokens if kind == "prompt_tokens" else s.sampled_tokens
    return {"type": "prompt" if kind == "prompt_tokens" else "sampled", "sequence_id": arm.sequence_id,
            "offset": arm.offset, "length": arm.length}


# ---- results -------------------------------------------------------------------------------------
def forward_backward_output(out: ForwardBackwardOutput) -> bytes:
    """One ArrayRecord per datum (the SDK concatenates records), so ragged outputs need no padding."""
    msg = proto.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type or "ArrayRecord")
    for k, v in out.metrics.items():
        msg.metrics[k] = float(v)
    for per_datum in out.loss_fn_outputs:
        record = msg.loss_fn_outputs.add(type_tag=out.loss_fn_output_type or "ArrayRecord", num_datums=1)
        for name, td in per_datum.items():
            arr = np.asarray(td.to_numpy(), dtype=np.float32 if td.dtype == "float32" else np.int64)
            bt = record.fields[name]
            bt.dtype = proto.DTYPE_FLOAT32 if td.dtype == "float32" else proto.DTYPE_INT64
            bt.data = arr.tobytes()
            bt.offsets = np.asarray([0, arr.nbytes], dtype=np.int64).tobytes()
            bt.trailing_shape.extend(list(arr.shape[1:]))
    return msg.SerializeToString()


def sample_response(resp: SampleResponse, topk: int) -> bytes:
    msg = proto.SampleResponse()
    for seq in resp.sequences:
        s = msg.sequences.add(stop_reason=proto.STOP_REASON.get(seq.stop_reason, 1),
                              tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes())
        if seq.logprobs is not None:
            s.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
    if resp.prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray([math.nan if x is None else x for x in resp.prompt_logprobs],
                                         dtype=np.float32).tobytes()
    if topk and resp.topk_prompt_logprobs is not None:
        rows = resp.topk_prompt_logprobs
        ids = np.zeros((len(rows), topk), dtype=np.int32)
        lps = np.full((len(rows), topk), -99999.0, dtype=np.float32)  # the SDK's "empty cell"
        for i, row in enumerate(rows):
            for j, (tok, lp) in enumerate((row or [])[:topk]):
                ids[i, j], lps[i, j] = tok, lp
        msg.topk_prompt_logprobs.token_ids = ids.tobytes()
        msg.topk_prompt_logprobs.logprobs = lps.tobytes()
        msg.topk_prompt_logprobs.k, msg.topk_prompt_logprobs.length = topk, len(rows)
    return msg.SerializeToString()


# ---- the JSON sample request ---------------------------------------------------------------------
def sample_inputs(body: dict[str, Any]) -> tuple[ModelInput, int, SamplingParams, bool, int]:
    """(prompt, num_samples, params, include_prompt_logprobs, topk) of a Tinker ``SampleRequest``."""
    for field in ("topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(field):
            raise InvalidRequestError(f"{field} is not supported by loops samplers; leave it 0", field=field)
    if body.get("target_prompt_logprobs") is not None:
        raise InvalidRequestError("target_prompt_logprobs is not supported by loops samplers",
                                  field="target_prompt_logprobs")
    if body.get("prompt_logprobs_last_n") is not None:
        raise InvalidRequestError("prompt_logprobs_last_n is not supported by loops samplers; score the whole "
                                  "prompt", field="prompt_logprobs_last_n")
    try:
        prompt = ModelInput.model_validate(body.get("prompt"))
        params = SamplingParams.model_validate(body.get("sampling_params") or {})
    except ValueError as exc:
        raise InvalidRequestError(f"SampleRequest: {exc}", field="prompt") from None
    n = body.get("num_samples", 1)
    topk = body.get("topk_prompt_logprobs") or 0
    if not isinstance(n, int) or n < 1:
        raise InvalidRequestError(f"num_samples must be a positive integer, got {n!r}", field="num_samples")
    return prompt, n, params, bool(body.get("prompt_logprobs")) or topk > 0, topk
