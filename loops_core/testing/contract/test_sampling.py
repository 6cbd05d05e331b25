"""Contract: SamplingClient behaviour and version pinning."""

from __future__ import annotations

import asyncio
import math
import pickle

import pytest

from loops_core import AdamParams, ModelInput, SampleResponse, SamplingClient, SamplingParams
from loops_core.testing.contract.data import france, logprobs_of, sft_datum

LR = AdamParams(learning_rate=5e-2, grad_clip_norm=0.0)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@pytest.fixture
def pair(tc):
    return france(tc.get_tokenizer())


def _train(tc, datum, steps: int) -> None:
    for _ in range(steps):
        tc.forward_backward([datum]).result(timeout=600)
        tc.optim_step(LR).result(timeout=600)


@pytest.mark.requires("sampler_pinning")
def test_pinned_client_samples_exactly_its_version(tc, pair):
    prompt, answer = pair
    datum = sft_datum(prompt, answer)
    p = ModelInput.from_ints(prompt)
    _train(tc, datum, 2)
    v1 = tc.save_weights_and_get_sampling_client(name="pin").result(timeout=600)
    first = v1.sample(p, 1, GREEDY)
    first_lp = v1.compute_logprobs(p)
    _train(tc, datum, 6)
    v2 = tc.save_weights_and_get_sampling_client(name="pin").result(timeout=600)  # same name, newer version
    assert v2.policy_version == v1.policy_version + 1
    again = v1.sample(p, 1, GREEDY)
    assert again.policy_version == first.policy_version == v1.policy_version
    assert again.sequences[0].tokens == first.sequences[0].tokens
    assert v1.compute_logprobs(p)[1:] == pytest.approx(first_lp[1:])
    assert v2.compute_logprobs(p)[1:] != pytest.approx(first_lp[1:]), "the new version must differ"
    assert v2.sample(p, 1, GREEDY).policy_version == v2.policy_version


def test_sampler_logprobs_agree_with_trainer(tc, pair):
    prompt, answer = pair
    datum = sft_datum(prompt, answer)
    _train(tc, datum, 2)
    sc = tc.save_weights_and_get_sampling_client(name="agree").result(timeout=600)
    tokens = prompt + answer
    sampler = sc.compute_logprobs(ModelInput.from_ints(tokens))
    assert sampler[0] is None and len(sampler) == len(tokens)
    trainer = logprobs_of(tc.forward([sft_datum([tokens[0]], tokens[1:])]).result(timeout=600))
    assert all(math.isclose(s, t, rel_tol=2e-2, abs_tol=2e-2) for s, t in zip(sampler[1:], trainer)), (sampler, trainer)


def test_sample_features(tc, pair):
    prompt, _ = pair
    sc = tc.save_weights_and_get_sampling_client(name="features").result(timeout=600)
    p = ModelInput.from_ints(prompt)
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=11)
    a, b = sc.sample(p, 3, params), sc.sample(p, 3, params)
    assert isinstance(a, SampleResponse) and len(a.sequences) == 3
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences], "same seed, same tokens"
    for s in a.sequences:
        assert 1 <= len(s.tokens) <= 5 and len(s.logprobs) == len(s.tokens) and s.stop_reason in ("stop", "length")
        assert s.sequence_id
    top = sc.sample(p, 1, SamplingParams(max_tokens=1, top_k=1, temperature=1.0, seed=3))
    greedy = sc.sample(p, 1, SamplingParams(max_tokens=1, temperature=0.0))
    assert top.sequences[0].tokens == greedy.sequences[0].tokens
    stop_id = greedy.sequences[0].tokens[0]
    stopped = sc.sample(p, 1, SamplingParams(max_tokens=5, temperature=0.0, stop=[stop_id]))
    assert stopped.sequences[0].stop_reason == "stop" and stopped.sequences[0].tokens[-1] == stop_id
    with_plp = sc.sample(p, 1, GREEDY, include_prompt_logprobs=True, topk_prompt_logprobs=3)
    assert with_plp.prompt_logprobs[0] is None and len(with_plp.prompt_logprobs) == len(prompt)
    row = with_plp.topk_prompt_logprobs[1]
    assert len(row) == 3 and [lp for _, lp in row] == sorted((lp for _, lp in row), reverse=True)


def test_sampled_topk_target_logprobs_and_cache_hits(tc, pair):
    """The response fields Tinker code reads are computed, not defaulted."""
    prompt, _ = pair
    sc = tc.save_weights_and_get_sampling_client(name="fields").result(timeout=600)
    p = ModelInput.from_ints(prompt)
    out = sc.sample(p, 1, GREEDY, topk_sample_logprobs=3)
    seq = out.sequences[0]
    assert seq.topk_logprobs is not None and len(seq.topk_logprobs) == len(seq.tokens)
    for token, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
        assert len(row) == 3 and [v for _, v in row] == sorted((v for _, v in row), reverse=True)
        assert row[0][0] == token and row[0][1] == pytest.approx(lp, abs=1e-4), "greedy samples the top token"
    assert isinstance(out.prompt_cache_hit_tokens, int) and 0 <= out.prompt_cache_hit_tokens < len(prompt)
    targets = [[prompt[i + 1], -1] for i in range(len(prompt) - 1)]
    scored = sc.sample(p, 1, GREEDY, include_prompt_logprobs=True, target_prompt_logprobs=targets)
    got = scored.target_prompt_logprobs
    assert got is not None and len(got) == len(prompt) - 1 and all(len(r) == 2 for r in got)
    assert [r[0] for r in got] == pytest.approx(scored.prompt_logprobs[1:], abs=1e-4)
    assert all(r[1] == 0.0 for r in got), "a -1 cell asks for nothing"


def test_discovery_tokenizer_readiness_and_pickling(tc, pair):
    sc = tc.save_weights_and_get_sampling_client(name="disco").result(timeout=600)
    assert sc.discover_base_model_name()
    assert sc.discover_adapter_name() is not None
    assert sc.get_base_model() == tc.get_info().model_name
    assert sc.get_tokenizer().decode(pair[0])
    assert sc.ensure_ready() is None
    assert asyncio.run(sc.ensure_ready_async(30.0)) is None
    SamplingClient.ensure_ready_for_deployment(base_model=sc.get_base_model(), deployment=sc.endpoint,
                                               ready_timeout=30)
    clone = pickle.loads(pickle.dumps(sc))
    p = ModelInput.from_ints(pair[0])
    assert clone.sample(p, 1, GREEDY).sequences[0].tokens == sc.sample(p, 1, GREEDY).sequences[0].tokens
    clone.close()
    sc.close()


def test_sampling_client_from_checkpoint_path(tc, pair):
    datum = sft_datum(*pair)
    _train(tc, datum, 3)
    saved = tc.save_weights_for_sampler("by-path").result(timeout=600)
    expected = tc.save_weights_and_get_sampling_client(name="by-path-ref").result(timeout=600)
    p = ModelInput.from_ints(pair[0])
    _train(tc, datum, 3)
    tc.save_weights_for_sampler("later").result(timeout=600)
    by_path = tc.create_sampling_client(saved.path)
    assert by_path.compute_logprobs(p)[1:] == pytest.approx(expected.compute_logprobs(p)[1:], rel=1e-5)


@pytest.mark.requires("standalone_sampler")
def test_service_standalone_sampler(service, contract_model, tc, pair):
    sc = service.create_sampling_client(base_model=contract_model)
    out = sc.sample(ModelInput.from_ints(pair[0]), 2, SamplingParams(max_tokens=3, seed=0))
    assert len(out.sequences) == 2 and out.policy_version in (0, None)

    saved = tc.save_weights_for_sampler("standalone").result(timeout=600)

    async def run():
        c = await service.create_sampling_client_async(model_path=saved.path)
        return await c.sample_async(ModelInput.from_ints(pair[0]), 1, GREEDY)

    import asyncio

    assert len(asyncio.run(run()).sequences) == 1
