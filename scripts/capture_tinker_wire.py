"""Capture request bodies exactly as the real tinker SDK sends them, into tests/data/tinker_wire/.

Runs in an interpreter that has ``tinker==0.38.0`` (not loops' environment, where ``tinker`` is
loops' shim), e.g. the side venv the tests build::

    ~/.cache/loops/side-venvs/tinker-0.38.0-*/bin/python scripts/capture_tinker_wire.py

The SDK's own resource methods (``client.training.forward_backward``, ``client.sampling.asample``,
...) send each request through an httpx transport that records the body and headers instead of
sending them, so the bytes are the SDK's, zstd and all. For each case it writes ``<case>.body``
(the raw body), ``<case>.meta.json`` (route, headers) and, for forward/backward, the SDK's own JSON
form of the same request as ``<case>.expect.json``: what a decoder must recover from the bytes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import tinker
from tinker import types
from tinker._client import AsyncTinker
from tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tinker_wire"
captured: list[httpx.Request] = []


def record(request: httpx.Request) -> httpx.Response:
    captured.append(request)
    return httpx.Response(200, json={"request_id": "captured"})


def client(compress: bool) -> AsyncTinker:
    return AsyncTinker(api_key="tml-capture", base_url="http://capture.invalid",
                       http_client=httpx.AsyncClient(transport=httpx.MockTransport(record)),
                       _client_config=types.ClientConfigResponse(proto_compress_fwdbwd=compress))


def datum(tokens: list[int], **inputs: object) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)  # type: ignore[arg-type]


def fb_cases() -> dict[str, tuple[types.ForwardBackwardRequest, bool, bool]]:
    """name -> (request, forward_only, zstd)."""
    sl = [datum([5, 6, 7, 8], target_tokens=[6, 7, 8, 9], weights=[0.0, 1.0, 1.0, 1.0]),
          datum([11, 12], target_tokens=[12, 13], weights=[1.0, 0.5])]
    rl = [datum([3, 4, 5], target_tokens=[4, 5, 6], logprobs=[-1.5, -0.25, -2.0], advantages=[0.0, 1.0, -1.0])]
    # a [T, K] target in sparse CSR form (rows 0 and 2 listed), with string and number loss config
    sparse_targets = types.TensorData(data=[7, 8, 9], dtype="int64", shape=[3, 2],
                                      sparse_crow_indices=[0, 2, 2, 3], sparse_col_indices=[0, 1, 0])
    sparse_weights = types.TensorData(data=[1.0, 0.5, 2.0], dtype="float32", shape=[3, 2],
                                      sparse_crow_indices=[0, 2, 2, 3], sparse_col_indices=[0, 1, 0])
    sparse = [datum([1, 2, 3], target_tokens=sparse_targets, weights=sparse_weights)]
    spans = [types.Datum(
        model_input=types.ModelInput.from_ints([20, 21, 22, 23]),
        loss_fn_inputs={"target_tokens": [21, 22, 23, 24], "logprobs": [-1.0, -1.0, -0.5, -0.5],
                        "advantages": [0.0, 0.0, 1.0, 1.0]},
        model_input_spans=[PromptProvenanceSpan(sequence_id="seq-a", offset=0, length=2),
                           SampledProvenanceSpan(sequence_id="seq-a", offset=0, length=2)],
        loss_fn_input_spans=[PromptProvenanceSpan(sequence_id="seq-a", offset=1, length=1),
                             SampledProvenanceSpan(sequence_id="seq-a", offset=0, length=3)])]

    def req(data: list[types.Datum], loss_fn: str, config: dict | None = None) -> types.ForwardBackwardRequest:
        return types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
            model_id="s-capture:train:0", seq_id=3)

    return {
        "fwdbwd_cross_entropy_zstd": (req(sl, "cross_entropy"), False, True),
        "fwdbwd_ppo_config": (req(rl, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}), False, False),
        "forward_sparse_csr": (req(sparse, "cross_entropy", {"note": "text-valued", "scale": 2.0}), True, False),
        "fwdbwd_provenance_spans": (req(spans, "importance_sampling"), False, False),
    }


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (request, forward_only, compress) in fb_cases().items():
        captured.clear()
        await client(compress).training.forward_backward(request=request, forward_only=forward_only)
        write(name, captured[-1], expected(request, forward_only))

    json_cases = {
        "optim_step": lambda c: c.training.optim_step(request=types.OptimStepRequest(
            adam_params=types.AdamParams(learning_rate=1e-3, weight_decay=0.01), model_id="s-capture:train:0",
            seq_id=4)),
        "asample": lambda c: c.sampling.asample(request=types.SampleRequest(
            sampling_session_id="s-capture:sample:0", seq_id=0, num_samples=2,
            prompt=types.ModelInput.from_ints([1, 2, 3]), prompt_logprobs=True, topk_prompt_logprobs=2,
            sampling_params=types.SamplingParams(max_tokens=8, temperature=0.7, stop=["\n"], seed=1))),
        "save_weights": lambda c: c.weights.save(request=types.SaveWeightsRequest(
            model_id="s-capture:train:0", path="step-1", seq_id=5)),
        "load_weights_new_model": lambda c: c.weights.load(request=types.LoadWeightsRequest(
            session_id="s-capture", model_seq_id=1, path="tinker://s-capture:train:0/weights/step-1", optimizer=True)),
        "create_model": lambda c: c.models.create(request=types.CreateModelRequest(
            session_id="s-capture", model_seq_id=0, base_model="loops/tiny-qwen3",
            lora_config=types.LoraConfig(rank=8, seed=0))),
    }
    for name, call in json_cases.items():
        captured.clear()
        await call(client(False))
        write(name, captured[-1], None)
    print(f"captured {len(fb_cases()) + len(json_cases)} request bodies from tinker {tinker.__version__} into {OUT}")


def expected(request: types.ForwardBackwardRequest, forward_only: bool) -> dict:
    """The request in plain JSON, read off the SDK's own objects (they are dataclasses over numpy)."""
    def tensor(td: types.TensorData) -> dict:
        out = {"data": td._numpy.reshape(-1).tolist(), "dtype": td.dtype, "shape": td.shape}
        if td.sparse_crow_indices is not None:
            out |= {"sparse_crow_indices": list(td.sparse_crow_indices),
                    "sparse_col_indices": list(td.sparse_col_indices or [])}
        return out

    def spans(items: list | None) -> list | None:
        return None if items is None else [
            {"type": "sampled" if isinstance(s, SampledProvenanceSpan) else "prompt", "sequence_id": s.sequence_id,
             "offset": s.offset, "length": s.length} for s in items]

    fbi = request.forward_backward_input
    return {"model_id": request.model_id, "seq_id": request.seq_id, "forward_only": forward_only,
            "loss_fn": fbi.loss_fn, "loss_fn_config": dict(fbi.loss_fn_config) if fbi.loss_fn_config else None,
            "data": [{"tokens": d.model_input.to_ints(),
                      "loss_fn_inputs": {k: tensor(v) for k, v in d.loss_fn_inputs.items()},
                      "model_input_spans": spans(d.model_input_spans),
                      "loss_fn_input_spans": spans(d.loss_fn_input_spans)} for d in fbi.data]}


def write(name: str, request: httpx.Request, expect: dict | None) -> None:
    (OUT / f"{name}.body").write_bytes(request.content)
    keep = ("content-type", "content-encoding")
    meta = {"sdk_version": tinker.__version__, "method": request.method, "path": request.url.path,
            "headers": {k: v for k, v in request.headers.items() if k.lower() in keep}}
    (OUT / f"{name}.meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if expect is not None:
        (OUT / f"{name}.expect.json").write_text(json.dumps(expect, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if not tinker.__version__.startswith("0.38."):
        sys.exit(f"expected tinker 0.38.x, found {tinker.__version__}")
    asyncio.run(main())
