"""Contract: TrainingClient behaviour every backend must show."""

from __future__ import annotations

import asyncio
import math

import pytest

from loops_core import (AdamParams, Datum, ForwardBackwardOutput, FutureTimeoutError, GetInfoResponse,
                        InitTrainerServerResponse, LoopsError, ModelInput, OptimStepResponse, SamplingParams,
                        TensorData, UnknownRequestError)
from loops_core.losses import resolve_config
from loops_core.testing.contract.data import dpo_pair, france, logprobs_of, rl_datum, sft_datum
from loops_core.testing.contract.reference_losses import dpo_loss, rl_loss

LR = AdamParams(learning_rate=2e-2, grad_clip_norm=0.0)


@pytest.fixture
def pair(tc):
    return france(tc.get_tokenizer())


def test_forward_backward_lowers_loss_and_reports_tinker_metrics(tc, pair):
    datum = sft_datum(*pair)
    losses = []
    for _ in range(8):
        out = tc.forward_backward([datum]).result(timeout=600)
        step = tc.optim_step(LR).result(timeout=600)
        losses.append(out.loss)
    assert isinstance(out, ForwardBackwardOutput) and isinstance(step, OptimStepResponse)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.95, losses
    assert out.metrics["loss:sum"] == pytest.approx(out.loss)
    assert all(k.count(":") == 1 for k in out.metrics), out.metrics
    lp = logprobs_of(out)
    prompt, _ = pair
    assert len(lp) == datum.model_input.length
    assert all(math.isnan(x) for x in lp[: len(prompt) - 1]), "masked positions must be NaN"
    assert all(x <= 0 for x in lp[len(prompt) - 1:])


def test_forward_leaves_accumulated_gradients_untouched(tc, pair):
    a = sft_datum(*pair)
    b = sft_datum(pair[0][:-1], pair[1])
    tc.forward_backward([a]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    reference = logprobs_of(tc.forward([a]).result(timeout=600))

    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    tc.forward_backward([a]).result(timeout=600)
    tc.forward([b]).result(timeout=600)  # interleaved: must not add or clear gradients
    tc.optim_step(LR).result(timeout=600)
    assert _close(logprobs_of(tc.forward([a]).result(timeout=600)), reference)


def test_gradients_accumulate_until_optim_step(tc, pair):
    a = sft_datum(*pair)
    b = sft_datum(pair[0][1:], pair[1])
    tc.forward_backward([a, b]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    together = logprobs_of(tc.forward([a]).result(timeout=600))

    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    tc.forward_backward([a]).result(timeout=600)
    tc.forward_backward([b]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    assert _close(logprobs_of(tc.forward([a]).result(timeout=600)), together)


def test_many_operations_in_flight_complete_in_order(tc, pair):
    datum = sft_datum(*pair)
    futures = []
    for _ in range(4):
        futures.append(tc.forward_backward([datum]))
        futures.append(tc.optim_step(LR))
    losses = [f.result(timeout=600).loss for f in futures[::2]]
    assert losses == sorted(losses, reverse=True), "later steps must see earlier updates"


def test_result_timeout_does_not_spoil_the_future(tc, pair):
    datum = sft_datum(*pair)
    pending = [tc.forward_backward([datum] * 4) for _ in range(3)]
    with pytest.raises(FutureTimeoutError) as info:
        pending[-1].result(timeout=0)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, LoopsError)
    assert pending[-1].result(timeout=600).loss > 0
    assert pending[-1].done()


def test_async_twins(tc, pair):
    datum = sft_datum(*pair)

    async def run():
        fb = await tc.forward_backward_async([datum])
        fwd = await tc.forward_async([datum])
        step = await tc.optim_step_async(LR)
        outs = await asyncio.gather(fb, fwd, step)
        init = await (await tc.init_trainer_server_async(8, seed=1234))
        sc = await (await tc.save_weights_and_get_sampling_client_async("async-pub"))
        pub = await (await tc.save_weights_for_sampler_async("async-pub-2"))
        sample = await sc.sample_async(ModelInput.from_ints(pair[0]), 1, SamplingParams(max_tokens=2, seed=1))
        lps = await sc.compute_logprobs_async(ModelInput.from_ints(pair[0]))
        await sc.aclose()
        return outs, init, pub, sample, lps

    (fb, fwd, step), init, pub, sample, lps = asyncio.run(run())
    assert fb.loss == pytest.approx(fwd.loss, rel=1e-4)
    assert isinstance(init, InitTrainerServerResponse) and init.lora_rank == 8
    assert pub.version >= 2 and pub.path
    assert len(sample.sequences) == 1 and lps[0] is None


@pytest.mark.requires("deterministic")
def test_same_seed_same_bits(tc, pair):
    datum = sft_datum(*pair)

    def run():
        tc.init_trainer_server(8, seed=7).result(timeout=600)
        out = []
        for _ in range(3):
            out.append(tc.forward_backward([datum]).result(timeout=600).loss)
            tc.optim_step(LR).result(timeout=600)
        return out

    assert run() == run()


def test_every_loss_function(tc, pair):
    """Each loss value equals the documented formula applied to the logprobs the trainer returns."""
    prompt, answer = pair
    # sampler logprobs off from the trainer's, so the ratios differ from 1 and the clips matter
    rl = rl_datum(prompt, answer, [-0.5 - 0.3 * i for i in range(len(answer))], advantage=1.5)
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        out = tc.forward([rl], loss_fn).result(timeout=600)
        assert "loss:sum" in out.metrics, loss_fn
        assert len(logprobs_of(out)) == rl.model_input.length
        expected = rl_loss(loss_fn, rl, logprobs_of(out), resolve_config(loss_fn, None))
        assert out.loss == pytest.approx(expected, rel=1e-4, abs=1e-5), loss_fn
        fb = tc.forward_backward([rl], loss_fn).result(timeout=600)
        assert fb.loss == pytest.approx(out.loss, rel=1e-4, abs=1e-5), f"{loss_fn}: forward and backward disagree"
    chosen, rejected = dpo_pair(prompt, answer, answer[::-1])
    out = tc.forward_backward([chosen, rejected], "dpo", {"beta": 0.1}).result(timeout=600)
    assert "accuracy:mean" in out.metrics and len(out.loss_fn_outputs) == 2
    expected = dpo_loss(chosen, rejected, logprobs_of(out, 0), logprobs_of(out, 1), resolve_config("dpo", {"beta": 0.1}))
    assert out.loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    signed = sft_datum(prompt, answer)
    n = signed.model_input.length
    signed = Datum(model_input=signed.model_input, loss_fn_inputs={
        **signed.loss_fn_inputs, "weights": TensorData(data=[-0.5] * n, dtype="float32", shape=[n])})
    out = tc.forward_backward([signed]).result(timeout=600)
    assert out.loss < 0, "negative weights make the cross-entropy sum negative"
    assert out.loss == pytest.approx(rl_loss("cross_entropy", signed, logprobs_of(out), {}), rel=1e-4)


def test_forward_backward_custom_matches_cross_entropy(tc, pair):
    torch = pytest.importorskip("torch")
    datum = sft_datum(*pair)
    tc.forward_backward([datum]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    reference = logprobs_of(tc.forward([datum]).result(timeout=600))

    def nll(data, logprobs):
        loss = -sum(lp.sum() for lp in logprobs)
        return loss, {"nll:sum": float(loss.detach())}

    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    out = tc.forward_backward_custom([datum], nll).result(timeout=600)
    assert out.metrics["nll:sum"] == pytest.approx(out.loss)
    assert "surrogate_loss:sum" in out.metrics
    tc.optim_step(LR).result(timeout=600)
    assert _close(logprobs_of(tc.forward([datum]).result(timeout=600)), reference, tol=1e-3)
    assert torch is not None

    async def run():
        return await (await tc.forward_backward_custom_async([datum], nll))

    assert asyncio.run(run()).loss > 0


def test_second_trainer_async(service, contract_model):
    async def run():
        other = await service.create_lora_training_client_async(contract_model, rank=4, seed=0)
        info = other.get_info()
        await other.aclose()
        return info

    assert asyncio.run(run()).lora_rank == 4


def test_idempotent_resubmission_runs_once(tc):
    body = {"adam_params": AdamParams().model_dump(), "model": tc.get_info().model_name}

    async def submit_twice():
        a = await tc._wire.submit("/optim_step", body, what="optim_step", key="contract-key-1")
        b = await tc._wire.submit("/optim_step", body, what="optim_step", key="contract-key-1")
        await tc._wire.poll(a, what="optim_step")
        info = await tc._wire.get_json("/get_info", what="get_info")
        return a, b, info

    from loops_core.futures import run_sync

    a, b, info = run_sync(submit_twice())
    assert a == b
    assert info["step"] == 1, "a resubmitted operation must run once"


def test_unknown_operation_is_unknown_request_error(tc):
    from loops_core.futures import run_sync

    with pytest.raises(UnknownRequestError):
        run_sync(tc._wire.poll("no-such-operation", what="poll"))


def test_info_tokenizer_health_and_policy_version(tc, service):
    info = tc.get_info()
    assert isinstance(info, GetInfoResponse) and info.lora_rank == 8 and info.model_name
    assert tc.run_id and isinstance(service.session_id, str)
    tok = tc.get_tokenizer()
    ids = tok.encode("Paris", add_special_tokens=False)
    assert "Paris" in tok.decode(ids)
    assert tc.health() is None
    before = tc.policy_version
    tc.save_weights_for_sampler("pv-check").result(timeout=600)
    assert tc.policy_version == before + 1
    caps = service.get_server_capabilities()
    assert hasattr(caps, "supported_models") and service.backend_name


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1, abs(y))
                                    for x, y in zip(a, b))
