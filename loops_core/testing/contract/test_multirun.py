"""Contract: many runs on one trainer + sampler pair — each isolated, ordered, pinned and closable.

The training clients of one ServiceClient on one base model share a pair (on backends that run the
servers); each gets a run of its own. A run's losses equal the same run trained alone.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from loops_core import AdamParams, ModelInput, NotFoundError
from loops_core.errors import InvalidRequestError
from loops_core.testing.contract.data import france, logprobs_of, sft_datum
from loops_core.wire import WireClient

LR = AdamParams(learning_rate=2e-2, grad_clip_norm=0.0)
STEPS = 3


def _lps(output) -> list:
    """The logprobs of the first datum, NaN (masked positions) made comparable."""
    return [None if x != x else x for x in logprobs_of(output)]


def _curve(tc, datum) -> list[float]:
    """Train ``STEPS`` steps, futures in flight; return the losses."""
    futures = []
    for _ in range(STEPS):
        futures.append(tc.forward_backward([datum]))
        tc.optim_step(LR)
    return [f.result(timeout=600).loss for f in futures]


def _datum(tc, i: int):
    prompt, answer = france(tc.get_tokenizer())
    return sft_datum(prompt[i % 3:], answer)  # a different example per run


@pytest.mark.parametrize("n_runs", [2, 8])
def test_concurrent_runs_each_equal_the_run_alone(service, contract_model, tc, n_runs):
    specs = [(4 + 2 * (i % 3), 100 + i) for i in range(n_runs)]  # (rank, seed): every run its own adapter
    with concurrent.futures.ThreadPoolExecutor(n_runs) as pool:
        clients = list(pool.map(lambda s: service.create_lora_training_client(contract_model, rank=s[0], seed=s[1]),
                                specs))
        try:
            assert len({c.run_id for c in clients}) == n_runs
            data = [_datum(c, i) for i, c in enumerate(clients)]  # tokenizers load outside the threads
            together = list(pool.map(lambda i: _curve(clients[i], data[i]), range(n_runs)))
            infos = [c.get_info() for c in clients]
        finally:
            for c in clients:
                c.close()
    assert [i.lora_rank for i in infos] == [r for r, _ in specs]
    for i, (rank, seed) in enumerate(specs):  # the same runs, one at a time, on the suite's own run
        tc.init_trainer_server(rank, seed=seed).result(timeout=600)
        assert together[i] == _curve(tc, _datum(tc, i)), f"run {i} differs from the same run alone"


def test_versions_pins_and_checkpoints_are_per_run(service, contract_model):
    a = service.create_lora_training_client(contract_model, rank=8, seed=1)
    b = service.create_lora_training_client(contract_model, rank=4, seed=2)
    try:
        prompt, answer = france(a.get_tokenizer())
        datum = sft_datum(prompt, answer)
        probe = ModelInput.from_ints(prompt + answer)
        for tc in (a, b):
            _curve(tc, datum)
        a1, b1 = a.save_weights_and_get_sampling_client("v1").result(timeout=600), \
            b.save_weights_and_get_sampling_client("v1").result(timeout=600)
        assert a1.policy_version == b1.policy_version == 1  # each run counts its own versions
        lp_a1, lp_b1 = a1.compute_logprobs(probe), b1.compute_logprobs(probe)
        assert lp_a1 != lp_b1  # two adapters, not one
        saved_a = a.save_state("same-name").result(timeout=600)
        saved_b = b.save_state("same-name").result(timeout=600)
        assert saved_a.path != saved_b.path and a.run_id in saved_a.path and b.run_id in saved_b.path
        before = _lps(a.forward([datum]).result(timeout=600))

        _curve(a, datum)  # a moves on; b and a's pinned v1 must not
        a2 = a.save_weights_and_get_sampling_client("v2").result(timeout=600)
        assert a2.policy_version == 2 and a2.compute_logprobs(probe) != lp_a1
        assert a1.compute_logprobs(probe) == lp_a1 and b1.compute_logprobs(probe) == lp_b1
        assert b.create_sampling_client(saved_b.path.replace("/weights/", "/sampler_weights/").replace(
            "same-name", "v1")).compute_logprobs(probe) == lp_b1

        a.load_state(saved_a.path).result(timeout=600)  # a's own checkpoint restores a only
        assert _lps(a.forward([datum]).result(timeout=600)) == before
        assert {c.checkpoint_id for c in a.list_checkpoints()} == {"same-name", "v1", "v2"}
        assert {c.checkpoint_id for c in b.list_checkpoints()} == {"same-name", "v1"}
    finally:
        a.close()
        b.close()


def test_training_clients_on_one_base_model_share_a_trainer(service, contract_model, tc):
    """Another client on the same base model is another run on the same trainer (unless that
    trainer's engine holds one run: then it must be a trainer of its own)."""
    from loops_core.futures import run_sync

    other = service.create_lora_training_client(contract_model, rank=4, seed=9)
    probe = WireClient(tc._endpoint, timeout=30.0, ready_timeout=30.0)
    try:
        listing = run_sync(probe.get_json("/runs", what="runs"))
        listed = {r["run_id"] for r in listing["runs"]}
        assert tc.run_id in listed
        if listing["many_runs"]:
            assert other.run_id in listed
        else:
            assert other.run_id not in listed and other._endpoint.url != tc._endpoint.url
    finally:
        run_sync(probe.aclose())
        other.close()


def test_closing_a_run_frees_it_and_leaves_the_others(service, contract_model):
    a = service.create_lora_training_client(contract_model, rank=4, seed=5)
    b = service.create_lora_training_client(contract_model, rank=4, seed=6)
    datum = _datum(a, 0)
    expected = _lps(b.forward([datum]).result(timeout=600))
    a.close()
    probe = WireClient(a._endpoint, timeout=30.0, ready_timeout=30.0)
    try:
        from loops_core.futures import run_sync

        with pytest.raises(NotFoundError, match=a.run_id):
            run_sync(probe.get_json("/get_info", what="get_info"))
    finally:
        run_sync(probe.aclose())
    assert _lps(b.forward([datum]).result(timeout=600)) == expected
    b.close()


def test_a_different_base_model_is_refused_naming_both(service, contract_model, tc):
    from loops_core.futures import run_sync

    probe = WireClient(tc._endpoint, timeout=30.0, ready_timeout=30.0)
    try:
        with pytest.raises(InvalidRequestError) as err:
            run_sync(probe.request("POST", "/runs", what="create run", retry=False,
                                   json={"base_model": "someone/else", "lora_rank": 4}))
        assert "someone/else" in str(err.value) and contract_model in str(err.value)
        datum = _datum(tc, 0).model_dump(mode="json")  # a valid request but for the model it names
        with pytest.raises(InvalidRequestError, match="someone/else"):
            run_sync(probe.submit("/forward", {"data": [datum], "model": "someone/else", "run_id": tc.run_id},
                                  what="forward"))
    finally:
        run_sync(probe.aclose())
