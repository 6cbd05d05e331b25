"""Contract: bad input is a clear error naming the field, and changes nothing.

Each case runs: reset → bad call (must raise ``InvalidRequestError``, a ``LoopsError`` and a
``ValueError``, naming the field) → one valid step. The valid step must give exactly the loss it
gives when the bad call never happened. Every case is checked twice: through the public client
(which validates before sending) and as a raw request to the server (which must refuse it with a
4xx on its own, for clients that do not validate).
"""

from __future__ import annotations

import pytest

from loops_core import (AdamParams, Datum, InvalidRequestError, LoopsError, ModelInput, NotFoundError,
                        SamplingParams, TensorData)
from loops_core.futures import run_sync
from loops_core.testing.contract.data import france, sft_datum

LR = AdamParams(learning_rate=2e-2, grad_clip_norm=0.0)


def _good(tc) -> Datum:
    return sft_datum(*france(tc.get_tokenizer()))


def _with(d: Datum, **inputs) -> Datum:
    return Datum.model_construct(model_input=d.model_input, loss_fn_inputs={**d.loss_fn_inputs, **inputs},
                                 routed_experts_ref=None)


def _cases(tc):
    good = _good(tc)
    n = good.model_input.length
    target = good.loss_fn_inputs["target_tokens"]
    vocab = 10_000_000
    return {
        "wrong_dtype": ([_with(good, target_tokens=TensorData.model_construct(
            data=[float(x) for x in target.data], dtype="float32", shape=[n]))], "cross_entropy", "target_tokens"),
        "length_mismatch": ([_with(good, target_tokens=TensorData(data=target.data[:-1], dtype="int64",
                                                                  shape=[n - 1]))], "cross_entropy", "target_tokens"),
        "shape_mismatch": ([_with(good, weights=TensorData(data=[1.0] * (2 * n), dtype="float32",
                                                           shape=[n, 2]))], "cross_entropy", "weights"),
        "token_out_of_vocab": ([Datum(model_input=ModelInput.from_ints([vocab] * n),
                                      loss_fn_inputs=good.loss_fn_inputs)], "cross_entropy", "model_input"),
        "unknown_loss_fn": ([good], "cross_entropy_typo", "loss_fn"),
        "missing_key": ([_with(good, logprobs=TensorData(data=[0.0] * n, dtype="float32", shape=[n]))],
                        "importance_sampling", "advantages"),
        "empty_batch": ([], "cross_entropy", "data"),
    }


def _reference_loss(tc) -> float:
    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    good = _good(tc)
    tc.forward_backward([good]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    return tc.forward_backward([good]).result(timeout=600).loss


def _valid_step_loss(tc) -> float:
    good = _good(tc)
    tc.forward_backward([good]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    return tc.forward_backward([good]).result(timeout=600).loss


CASES = ["wrong_dtype", "length_mismatch", "shape_mismatch", "token_out_of_vocab", "unknown_loss_fn",
         "missing_key", "empty_batch"]


@pytest.mark.parametrize("case", CASES)
def test_bad_forward_backward_is_refused_and_changes_nothing(tc, case):
    reference = _reference_loss(tc)
    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    data, loss_fn, field = _cases(tc)[case]
    with pytest.raises(InvalidRequestError) as info:
        tc.forward_backward(data, loss_fn).result(timeout=600)
    assert isinstance(info.value, LoopsError) and isinstance(info.value, ValueError)
    assert field in str(info.value.field or "") + str(info.value), (info.value.field, str(info.value))
    assert _valid_step_loss(tc) == reference


@pytest.mark.parametrize("case", CASES)
def test_server_refuses_bad_input_on_its_own(tc, case):
    reference = _reference_loss(tc)
    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    data, loss_fn, field = _cases(tc)[case]
    body = {"data": [d.model_dump(mode="json") for d in data], "loss_fn": loss_fn, "loss_fn_config": None}
    with pytest.raises(InvalidRequestError) as info:
        run_sync(tc._wire.submit("/forward_backward", body, what="forward_backward"))
    assert info.value.status_code == 400 and field in (info.value.field or "") + str(info.value)
    assert _valid_step_loss(tc) == reference


def test_negative_rank_is_refused(service, contract_model, tc):
    with pytest.raises(InvalidRequestError) as info:
        service.create_lora_training_client(contract_model, rank=-1)
    assert info.value.field == "rank"
    with pytest.raises(InvalidRequestError):
        tc.init_trainer_server(-4)
    with pytest.raises(InvalidRequestError):
        run_sync(tc._wire.submit("/init_trainer_server", {"lora_rank": -4}, what="init"))
    reference = _reference_loss(tc)
    assert tc.get_info().lora_rank == 8 and reference > 0


def test_bad_optimizer_and_sampling_params_are_refused(tc):
    with pytest.raises(ValueError):
        AdamParams(learning_rate=-1.0)
    with pytest.raises(ValueError):
        AdamParams(learning_rte=1e-3)  # typo: unknown field
    with pytest.raises(InvalidRequestError):
        run_sync(tc._wire.submit("/optim_step", {"adam_params": {"learning_rate": "fast"}}, what="optim"))
    with pytest.raises(ValueError):
        SamplingParams(max_token=16)
    sc = tc.save_weights_and_get_sampling_client("bad-sample").result(timeout=600)
    with pytest.raises(InvalidRequestError) as info:
        sc.sample(ModelInput.from_ints([10_000_000]), 1, SamplingParams(max_tokens=1))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError):
        sc.sample(ModelInput.from_ints([1, 2]), 0)
    assert len(sc.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=1)).sequences) == 1


@pytest.mark.requires("checkpoints")
def test_bad_checkpoint_paths(tc, tmp_path):
    with pytest.raises(NotFoundError):
        tc.load_state("loops://no-such-run/weights/nothing").result(timeout=600)
    with pytest.raises(InvalidRequestError):
        tc.load_state("s3://bucket/x").result(timeout=600)
    with pytest.raises(InvalidRequestError):
        tc.save_state("../escape").result(timeout=600)
    with pytest.raises(InvalidRequestError):
        tc.create_sampling_client("loops://run/weights/x")
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    with pytest.raises(InvalidRequestError):  # outside the server's checkpoint roots, existing or not
        tc.load_state(str(empty)).result(timeout=600)
    assert _valid_step_loss(tc) == _reference_loss(tc)
