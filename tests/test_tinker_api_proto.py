"""The Tinker wire decoder against bodies the real tinker 0.38.0 SDK produced.

``scripts/capture_tinker_wire.py`` recorded them (``tests/data/tinker_wire/``): each
forward/backward body comes with the SDK's own view of the same request, which the decoder must
recover field by field. The encoders are checked by the end-to-end tests, where the real SDK reads
what they write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("google.protobuf")
pytest.importorskip("zstandard")

from loops_core.errors import InvalidRequestError  # noqa: E402
from loops_core.tinker_api import convert, proto  # noqa: E402
from loops_core.types import ForwardBackwardOutput, SampledSequence, SampleResponse, TensorData  # noqa: E402

WIRE = Path(__file__).parent / "data" / "tinker_wire"
FB_CASES = sorted(p.name[: -len(".expect.json")] for p in WIRE.glob("*.expect.json"))


def _decode(name: str):  # noqa: ANN202
    meta = json.loads((WIRE / f"{name}.meta.json").read_text())
    assert meta["sdk_version"] == "0.38.0"
    raw = convert.decompress((WIRE / f"{name}.body").read_bytes(), meta["headers"].get("content-encoding"))
    return convert.parse_forward_backward(raw)


def test_captures_cover_zstd_sparse_config_and_spans():
    assert set(FB_CASES) >= {"fwdbwd_cross_entropy_zstd", "fwdbwd_ppo_config", "forward_sparse_csr",
                             "fwdbwd_provenance_spans"}
    meta = json.loads((WIRE / "fwdbwd_cross_entropy_zstd.meta.json").read_text())
    assert meta["headers"] == {"content-encoding": "zstd", "content-type": "application/x-protobuf"}


@pytest.mark.parametrize("name", FB_CASES)
def test_decoder_recovers_what_the_sdk_sent(name: str):
    expect = json.loads((WIRE / f"{name}.expect.json").read_text())
    msg = _decode(name)
    assert (msg.model_id, msg.seq_id, msg.loss_fn, msg.forward_only) == (
        expect["model_id"], expect["seq_id"], expect["loss_fn"], expect["forward_only"])
    assert convert.loss_fn_config(msg) == expect["loss_fn_config"]
    data = convert.datums(msg)
    assert len(data) == len(expect["data"])
    for got, want in zip(data, expect["data"]):
        assert got.model_input.to_ints() == want["tokens"]
        assert set(got.loss_fn_inputs) == set(want["loss_fn_inputs"])
        for key, td in want["loss_fn_inputs"].items():
            mine = got.loss_fn_inputs[key]
            assert (mine.dtype, mine.shape) == (td["dtype"], td["shape"]), key
            assert mine.data == pytest.approx(td["data"]), key
            assert mine.sparse_crow_indices == td.get("sparse_crow_indices"), key
            assert mine.sparse_col_indices == td.get("sparse_col_indices"), key
        for field in ("model_input_spans", "loss_fn_input_spans"):
            spans = getattr(got, field)
            assert (None if spans is None else [s.model_dump() for s in spans]) == want[field]


def test_sparse_targets_densify_like_the_sdk():
    (datum,) = convert.datums(_decode("forward_sparse_csr"))
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [[7, 8], [0, 0], [9, 0]]


@pytest.mark.parametrize("body, encoding, field", [
    (b"\xff\xff\xff", None, "body"),                      # not a protobuf
    (b"not zstd at all", "zstd", "body"),                  # says zstd, is not
    (b"", None, "model_id"),                              # empty message
    (b"x", "gzip", "Content-Encoding"),                   # an encoding the server does not take
])
def test_malformed_bodies_name_the_field(body: bytes, encoding: str | None, field: str):
    with pytest.raises(InvalidRequestError) as err:
        convert.parse_forward_backward(convert.decompress(body, encoding))
    assert err.value.field == field


def test_ragged_token_bytes_are_rejected():
    msg = proto.ForwardBackwardRequest(model_id="m")
    msg.data.add().model_input.add().encoded_text.tokens = b"\x01\x00\x00"  # 3 bytes: not int32s
    with pytest.raises(InvalidRequestError, match="int32"):
        convert.datums(msg)


def test_outputs_round_trip_through_the_descriptor():
    out = ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": TensorData(data=[-1.0, float("nan")], dtype="float32")},
                                                 {"logprobs": TensorData(data=[-2.0], dtype="float32")}],
                                metrics={"loss:sum": 3.0})
    msg = proto.ForwardBackwardOutput()
    msg.ParseFromString(convert.forward_backward_output(out))
    assert dict(msg.metrics) == {"loss:sum": 3.0}
    assert [r.num_datums for r in msg.loss_fn_outputs] == [1, 1]
    first = msg.loss_fn_outputs[0].fields["logprobs"]
    assert len(first.data) == 8 and first.dtype == proto.DTYPE_FLOAT32

    resp = SampleResponse(sequences=[SampledSequence(tokens=[4, 5], logprobs=[-0.5, -1.5], stop_reason="stop")],
                          prompt_logprobs=[None, -2.0], topk_prompt_logprobs=[None, [(7, -0.1)]])
    msg = proto.SampleResponse()
    msg.ParseFromString(convert.sample_response(resp, topk=2))
    assert msg.sequences[0].stop_reason == proto.STOP_REASON["stop"]
    assert len(msg.sequences[0].tokens) == 8 and msg.topk_prompt_logprobs.k == 2
    assert math.isnan(__import__("numpy").frombuffer(msg.prompt_logprobs, dtype="float32")[0])
