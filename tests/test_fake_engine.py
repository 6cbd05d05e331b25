"""The fake engine: its gradients, losses, optimizer, state and sampler, checked against
independent straightforward re-implementations written here."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loops_backends.fake.engine import FakeSamplerEngine, FakeTrainerEngine, base_table
from loops_backends.fake.tokenizer import FAKE_TOKENIZER_ID, FakeTokenizer, load_fake_tokenizer
from loops_core.engine import GenerationRequest
from loops_core.types import AdamParams, Datum, ModelInput, TensorData

TOK = load_fake_tokenizer()
V = TOK.vocab_size
MODEL = "test/fake-model"


# ---- helpers -------------------------------------------------------------------------------

def make_datum(x, targets, **inputs) -> Datum:
    lfi = {"target_tokens": TensorData.from_numpy(np.asarray(targets, dtype=np.int64))}
    for key, value in inputs.items():
        lfi[key] = TensorData.from_numpy(np.asarray(value, dtype=np.float32))
    return Datum(model_input=ModelInput.from_ints([int(t) for t in x]), loss_fn_inputs=lfi)


def spec_of(datum: Datum) -> dict:
    """The datum as plain float64/int64 arrays (float inputs rounded through float32 as sent)."""
    s = {k: td.to_numpy().astype(np.float64) for k, td in datum.loss_fn_inputs.items()}
    s["targets"] = datum.loss_fn_inputs["target_tokens"].to_numpy().astype(np.int64)
    s["x"] = np.asarray(datum.model_input.to_ints())
    return s


def ref_token_lp(w0, a, b, prev, target) -> float:
    z = w0[prev] + a[prev] @ b
    zmax = z.max()
    return float(z[target] - (zmax + math.log(np.exp(z - zmax).sum())))


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def ref_loss(loss_fn, datums, cfg, w0, a, b, sg=None):
    """The loss table of loops_core.losses, token by token. ``sg``: frozen per-datum logprobs for
    the stop-gradient terms (cispo). Returns (loss, per-datum {index: lp}, metrics)."""
    specs = [spec_of(d) for d in datums]
    lps = []
    for s in specs:
        lps.append({idx: ref_token_lp(w0, a, b, s["x"][idx[0]], s["targets"][idx])
                    for idx in np.ndindex(s["targets"].shape) if s["targets"][idx] >= 0})
    total, ratios, clipped, margins, masks = 0.0, [], [], [], []
    if loss_fn == "dpo":
        beta, ls = cfg["beta"], cfg["label_smoothing"]

        def score(i):
            w = specs[i].get("weights", np.ones(specs[i]["targets"].shape))
            return sum(w[idx] * (lp - specs[i]["ref_logprobs"][idx]) for idx, lp in lps[i].items())

        for c in range(0, len(specs), 2):
            m = beta * (score(c) - score(c + 1))
            total += -(1 - ls) * log_sigmoid(m) - ls * log_sigmoid(-m)
            margins.append(m)
        return total, lps, {"accuracy:mean": float(np.mean(np.array(margins) > 0)),
                            "margin:mean": float(np.mean(margins))}
    for i, s in enumerate(specs):
        for idx, lp in lps[i].items():
            w = s["weights"][idx] if "weights" in s else 1.0
            t = idx[0]
            if loss_fn == "cross_entropy":
                total += -w * lp
                continue
            q, adv = s["logprobs"][t], s["advantages"][t]
            r = math.exp(lp - q)
            ratios.append(r)
            lo = s["clip_low_threshold"][t] if "clip_low_threshold" in s else cfg.get("clip_low_threshold")
            hi = s["clip_high_threshold"][t] if "clip_high_threshold" in s else cfg.get("clip_high_threshold")
            if loss_fn in ("ppo", "cispo"):
                clipped.append(r < lo or r > hi)
            if loss_fn == "importance_sampling":
                per = -r * adv
            elif loss_fn == "dppo":
                moved = math.exp(lp) - math.exp(q)
                m = moved > cfg["dppo_mask_high"] if adv > 0 else moved < -cfg["dppo_mask_low"]
                masks.append(float(m))
                per = -(1 - m) * cfg["adv_tau"] * adv * r + cfg["kl_tau"] * (lp - q) ** 2
            elif loss_fn == "ppo":
                per = -min(r * adv, min(max(r, lo), hi) * adv)
            elif loss_fn == "cispo":
                r_sg = math.exp((sg[i][idx] if sg else lp) - q)
                per = -min(max(r_sg, lo), hi) * adv * lp
            else:  # dro
                per = -(adv * lp - cfg["beta"] / 2 * (lp - q) ** 2)
            total += w * per
    metrics = {}
    if loss_fn != "cross_entropy":
        metrics["ratio:mean"] = float(np.mean(ratios))
    if loss_fn in ("ppo", "cispo"):
        metrics["clip_fraction:mean"] = float(np.mean(clipped))
    if loss_fn == "dppo":
        metrics["mask_fraction:mean"] = float(np.mean(masks))
    return total, lps, metrics


DEFAULTS = {
    "cross_entropy": {}, "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05}, "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    # Bounds at the scale of this vocabulary's probabilities (~1/259), so some tokens are masked.
    "dppo": {"dppo_mask_high": 8e-4, "dppo_mask_low": 8e-4, "adv_tau": 1.3, "kl_tau": 0.3},
}


def make_case(case: str, rng, w0, a, b):
    """(loss_fn, config, datums) for one gradient-check case, on tiny random inputs."""
    loss_fn = {"cross_entropy_2d": "cross_entropy", "cispo_override": "cispo"}.get(case, case)
    cfg = {"skip_token_normalization": 0.0, **DEFAULTS[loss_fn]}
    if loss_fn == "dro":
        cfg["beta"] = 0.7  # large enough that the quadratic term matters
    if loss_fn == "dpo":
        cfg.update(beta=0.5, label_smoothing=0.1)
    datums = []
    for _ in range(4 if loss_fn == "dpo" else 2):
        n = 7
        x = rng.integers(0, 40, n)  # a small token range, so some prev tokens repeat
        if case == "cross_entropy_2d":
            targets = rng.integers(0, V, (n, 3))
            targets[2, 1] = -100
            datums.append(make_datum(x, targets, weights=rng.normal(0, 1, (n, 3))))
            continue
        targets = rng.integers(0, V, n)
        targets[3] = -100
        true_lp = np.array([ref_token_lp(w0, a, b, p, t) if t >= 0 else 0.0 for p, t in zip(x, targets)])
        weights = rng.uniform(0.5, 1.5, n)
        weights[5] = 0.0
        inputs = {"weights": weights if case != "cross_entropy" else rng.normal(0, 1, n)}
        if loss_fn == "dpo":
            inputs["ref_logprobs"] = true_lp + rng.normal(0, 0.5, n)
        elif loss_fn != "cross_entropy":
            # Ratios spread around 1, wide enough to pass cispo's default upper clip of 4.
            inputs["logprobs"] = true_lp + rng.normal(0, 1.0 if case == "cispo" else 0.3, n)
            inputs["advantages"] = rng.normal(0, 1, n)
        if case == "cispo_override":
            inputs["clip_low_threshold"] = np.full(n, 0.9)
            inputs["clip_high_threshold"] = rng.uniform(1.0, 1.3, n)
        datums.append(make_datum(x, targets, **inputs))
    return loss_fn, cfg, datums


def fresh_engine(rank=4, seed=1) -> FakeTrainerEngine:
    """An engine whose B is non-zero, so gradients reach A too."""
    eng = FakeTrainerEngine(MODEL, lora_rank=rank, seed=seed)
    eng.lora_B = np.random.default_rng(99).normal(0, 0.5, (rank, V))
    return eng


CASES = ["cross_entropy", "cross_entropy_2d", "importance_sampling", "ppo", "cispo",
         "cispo_override", "dro", "dpo", "dppo"]
METRIC_KEYS = {
    "cross_entropy": set(), "importance_sampling": {"ratio:mean"}, "dro": {"ratio:mean"},
    "ppo": {"ratio:mean", "clip_fraction:mean"}, "cispo": {"ratio:mean", "clip_fraction:mean"},
    "dpo": {"accuracy:mean", "margin:mean"}, "dppo": {"ratio:mean", "mask_fraction:mean"},
}


# ---- (1) gradients and loss values -------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_gradient_and_value_match_reference(case):
    rng = np.random.default_rng(CASES.index(case))
    eng = fresh_engine()
    w0, a0, b0 = base_table(MODEL, V), eng.lora_A.copy(), eng.lora_B.copy()
    loss_fn, cfg, datums = make_case(case, rng, w0, a0, b0)

    out = eng.forward_backward(datums, loss_fn, cfg, backward=True)
    ga, gb = eng.grad_A.copy(), eng.grad_B.copy()

    # The value, the logprobs and the metrics against the token-by-token reference.
    ref, ref_lps, ref_metrics = ref_loss(loss_fn, datums, cfg, w0, a0, b0)
    assert out.loss == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert out.metrics["loss:sum"] == out.loss
    assert set(out.metrics) == {"loss:sum", "num_tokens:sum"} | METRIC_KEYS[loss_fn]
    assert out.metrics["num_tokens:sum"] == sum(len(d) for d in ref_lps)
    for key, value in ref_metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-9), key
    if loss_fn in ("ppo", "cispo"):
        assert 0 < out.metrics["clip_fraction:mean"] < 1  # the case exercises clipping
    for o, d, lps in zip(out.loss_fn_outputs, datums, ref_lps):
        got = o["logprobs"].to_numpy()
        assert o["logprobs"].dtype == "float32"
        assert got.shape == d.loss_fn_inputs["target_tokens"].to_numpy().shape
        for idx in np.ndindex(got.shape):
            if idx in lps:
                assert got[idx] == pytest.approx(lps[idx], rel=1e-6)
            else:
                assert np.isnan(got[idx])

    # Finite differences along random directions in A, in B, and in both.
    if loss_fn == "cispo":  # sg(clip(r)) is a constant of the gradient: freeze it
        def f(a, b):
            return ref_loss(loss_fn, datums, cfg, w0, a, b, sg=ref_lps)[0]
    else:  # the engine's own loss
        def f(a, b):
            eng.lora_A, eng.lora_B = a, b
            return eng.forward_backward(datums, loss_fn, cfg, backward=False).loss
    drng = np.random.default_rng(7)
    for use_a, use_b in [(1, 0), (0, 1), (1, 1)]:
        da, db = use_a * drng.normal(size=a0.shape), use_b * drng.normal(size=b0.shape)
        eps = 1e-5
        fd = (f(a0 + eps * da, b0 + eps * db) - f(a0 - eps * da, b0 - eps * db)) / (2 * eps)
        analytic = float((ga * da).sum() + (gb * db).sum())
        assert abs(analytic) > 1e-3
        assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-8)
    # backward=False left the accumulated gradient exactly alone.
    assert np.array_equal(eng.grad_A, ga) and np.array_equal(eng.grad_B, gb)
    # A rows of tokens that never occur as inputs get no gradient.
    used = {int(t) for d in datums for t in d.model_input.to_ints()}
    unused = [i for i in range(V) if i not in used]
    assert not ga[unused].any()


def test_skip_token_normalization_is_echoed():
    eng = fresh_engine()
    d = make_datum([1, 2, 3], [2, 3, 4])
    assert "skip_token_normalization" not in eng.forward_backward([d], "cross_entropy", {}, backward=False).metrics
    out = eng.forward_backward([d], "cross_entropy", {"skip_token_normalization": 1.0}, backward=False)
    assert out.metrics["skip_token_normalization"] == 1.0


# ---- (2) masking ---------------------------------------------------------------------------

def grads_of(data, loss_fn="cross_entropy"):
    eng = fresh_engine()
    out = eng.forward_backward(data, loss_fn, dict(DEFAULTS[loss_fn]), backward=True)
    return out, eng.grad_A.copy(), eng.grad_B.copy()


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_masked_and_zero_weight_positions_contribute_nothing(loss_fn):
    x, t = [5, 6, 7, 8, 9], [6, 7, 8, 9, 10]
    rl = {"logprobs": [-5.0, -6.0, -5.5, -4.0, -5.0], "advantages": [1.0, -1.0, 0.5, 2.0, -0.5]}
    rl = rl if loss_fn == "ppo" else {}
    full = make_datum(x, t, **rl)
    # Position 2 dropped: in a bigram model the other positions are unchanged.
    keep = [0, 1, 3, 4]
    dropped = make_datum([x[i] for i in keep], [t[i] for i in keep], **{k: [v[i] for i in keep] for k, v in rl.items()})
    masked = make_datum(x, [6, 7, -100, 9, 10], **rl)
    zero_w = make_datum(x, t, weights=[1, 1, 0, 1, 1], **rl)

    out_full, _, _ = grads_of([full], loss_fn)
    out_drop, ga, gb = grads_of([dropped], loss_fn)
    for datum in (masked, zero_w):
        out, ma, mb = grads_of([datum], loss_fn)
        np.testing.assert_allclose(ma, ga, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(mb, gb, rtol=1e-12, atol=1e-14)
        assert out.loss == pytest.approx(out_drop.loss, rel=1e-12)
    lp_masked = grads_of([masked], loss_fn)[0].loss_fn_outputs[0]["logprobs"].to_numpy()
    lp_zero = grads_of([zero_w], loss_fn)[0].loss_fn_outputs[0]["logprobs"].to_numpy()
    lp_full = out_full.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.isnan(lp_masked[2]) and not np.isnan(np.delete(lp_masked, 2)).any()
    assert np.isfinite(lp_zero[2]) and lp_zero[2] == lp_full[2]
    assert grads_of([masked], loss_fn)[0].metrics["num_tokens:sum"] == 4
    assert grads_of([zero_w], loss_fn)[0].metrics["num_tokens:sum"] == 5


def test_all_positions_masked_gives_zero_loss_and_gradient():
    out, ga, gb = grads_of([make_datum([1, 2], [-100, -100])])
    assert out.loss == 0.0 and out.metrics["num_tokens:sum"] == 0
    assert not ga.any() and not gb.any()


# ---- (3) gradient accumulation -----------------------------------------------------------------

def test_accumulation_equals_one_batch():
    x1 = make_datum([1, 2, 3, 4], [2, 3, 4, 5], weights=[1, 0.5, 1, 2])
    x2 = make_datum([9, 8, 7], [8, 7, -100])
    x3 = make_datum([40, 41], [41, 42])
    params = AdamParams(learning_rate=0.01)

    split, batch = fresh_engine(), fresh_engine()
    l1 = split.forward_backward([x1], "cross_entropy", {}, backward=True).loss
    probe = split.forward_backward([x3], "cross_entropy", {}, backward=False)  # changes nothing
    l2 = split.forward_backward([x2], "cross_entropy", {}, backward=True).loss
    both = batch.forward_backward([x1, x2], "cross_entropy", {}, backward=True).loss
    assert np.array_equal(split.grad_A, batch.grad_A) and np.array_equal(split.grad_B, batch.grad_B)
    assert both == pytest.approx(l1 + l2, rel=1e-15)
    assert probe.loss == fresh_engine().forward_backward([x3], "cross_entropy", {}, backward=False).loss
    assert split.optim_step(params) == batch.optim_step(params)
    assert np.array_equal(split.lora_A, batch.lora_A) and np.array_equal(split.lora_B, batch.lora_B)
    assert not split.grad_A.any() and not split.grad_B.any()  # zeroed by the step
    assert split.step == batch.step == 1


# ---- (4) it learns -------------------------------------------------------------------------

PROMPT = "What is the capital of France?\nAnswer:"


def paris_datum() -> tuple[list[int], Datum]:
    prompt = TOK.encode(PROMPT)
    tokens = prompt + TOK.encode(" Paris") + [TOK.eos_token_id]
    # Position i predicts tokens[i + 1]; prompt tokens are not trained on.
    targets = [-100] * (len(prompt) - 1) + tokens[len(prompt):]
    return prompt, make_datum(tokens[:-1], targets)


@pytest.fixture(scope="module")
def paris(tmp_path_factory):
    """A trainer taught ' Paris<eos>' after the prompt, and a sampler serving it as version 1."""
    prompt, datum = paris_datum()
    eng = FakeTrainerEngine(MODEL, lora_rank=8, seed=3)
    losses = []
    for _ in range(30):
        losses.append(eng.forward_backward([datum], "cross_entropy", {}, backward=True).loss)
        eng.optim_step(AdamParams(learning_rate=0.05))
    adapter = tmp_path_factory.mktemp("adapter")
    eng.export_adapter(adapter)
    sampler = FakeSamplerEngine(MODEL)
    asyncio.run(sampler.load_adapter(1, adapter))
    return eng, sampler, prompt, losses, adapter


def test_training_learns_paris(paris):
    eng, sampler, prompt, losses, adapter = paris
    assert losses[-1] < 0.05 * losses[0]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["bigram"]
    assert config["base_model_name_or_path"] == MODEL and "lora_alpha" in config
    greedy = GenerationRequest(prompt=prompt, max_tokens=12, temperature=0.0, adapter=1)
    seq = asyncio.run(sampler.generate(greedy)).sequences[0]
    assert seq.text.startswith(" Paris")
    assert seq.tokens == TOK.encode(" Paris") + [TOK.eos_token_id] and seq.finish_reason == "stop"
    base = asyncio.run(sampler.generate(GenerationRequest(prompt=prompt, max_tokens=6, temperature=0.0)))
    assert not base.sequences[0].text.startswith(" Paris")  # the base model did not know it


# ---- (5) determinism -------------------------------------------------------------------------

def run_script(seed: int) -> FakeTrainerEngine:
    eng = FakeTrainerEngine(MODEL, lora_rank=4, seed=seed)
    _, datum = paris_datum()
    for _ in range(3):
        eng.forward_backward([datum], "cross_entropy", {}, backward=True)
        eng.optim_step(AdamParams(learning_rate=0.01, weight_decay=0.1))
    return eng


def digest(eng: FakeTrainerEngine) -> str:
    return hashlib.sha256(eng.lora_A.tobytes() + eng.lora_B.tobytes()).hexdigest()


def test_same_seed_same_bits_even_in_another_process():
    assert digest(run_script(5)) == digest(run_script(5))
    assert digest(run_script(5)) != digest(run_script(6))
    code = ("import sys; sys.path.insert(0, %r); import test_fake_engine as t; "
            "print(t.digest(t.run_script(5)))" % str(Path(__file__).parent))
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest(run_script(5))  # no salted hash() anywhere


def test_init_lora_and_base_model_are_seeded():
    eng = FakeTrainerEngine(MODEL, lora_rank=4, seed=11)
    a = eng.lora_A.copy()
    eng.init_lora(4, 11)
    assert np.array_equal(eng.lora_A, a) and not eng.lora_B.any() and eng.step == 0
    eng.init_lora(6, 12)
    assert eng.lora_A.shape == (V, 6) and eng.lora_rank == 6
    assert not np.array_equal(base_table("model-a", V), base_table("model-b", V))
    assert eng.arch == "FakeBigramLM" and eng.tokenizer_id == FAKE_TOKENIZER_ID and eng.vocab_size == V


# ---- (6) save / load ---------------------------------------------------------------------------

def test_resume_is_bit_exact(tmp_path):
    _, datum = paris_datum()
    params = AdamParams(learning_rate=0.02, weight_decay=0.01, grad_clip_norm=0.5)

    def steps(eng, k):
        out = []
        for _ in range(k):
            out.append(eng.forward_backward([datum], "cross_entropy", {}, backward=True).loss)
            out.append(eng.optim_step(params)["grad_norm:mean"])
        return out

    straight = FakeTrainerEngine(MODEL, lora_rank=4, seed=2)
    expected = steps(straight, 6)
    first = FakeTrainerEngine(MODEL, lora_rank=4, seed=2)
    got = steps(first, 3)
    first.save_state(tmp_path)
    resumed = FakeTrainerEngine(MODEL, lora_rank=4, seed=777)  # different weights until loaded
    resumed.forward_backward([datum], "cross_entropy", {}, backward=True)  # stale grads get dropped
    resumed.load_state(tmp_path, with_optimizer=True)
    assert resumed.step == 3
    got += steps(resumed, 3)
    assert got == expected
    assert np.array_equal(resumed.lora_A, straight.lora_A) and np.array_equal(resumed.lora_B, straight.lora_B)
    assert resumed.step == straight.step == 6


def test_load_without_optimizer_and_errors(tmp_path):
    _, datum = paris_datum()
    eng = FakeTrainerEngine(MODEL, lora_rank=4, seed=2)
    for _ in range(2):
        eng.forward_backward([datum], "cross_entropy", {}, backward=True)
        eng.optim_step(AdamParams(learning_rate=0.02))
    eng.save_state(tmp_path)
    # Fresh Adam from the saved weights behaves like a fresh Adam that never stopped existing.
    other = FakeTrainerEngine(MODEL, lora_rank=4, seed=0)
    other.load_state(tmp_path, with_optimizer=False)
    assert other.step == 2 and np.array_equal(other.lora_A, eng.lora_A)
    reference = FakeTrainerEngine(MODEL, lora_rank=4, seed=0)
    reference.load_state(tmp_path, with_optimizer=True)
    for e in (other, reference):
        e.forward_backward([datum], "cross_entropy", {}, backward=True)
    first_step = AdamParams(learning_rate=0.02, beta1=0.5)
    other.optim_step(first_step)
    reference.optim_step(first_step)
    assert not np.array_equal(other.lora_B, reference.lora_B)  # the moments did differ

    with pytest.raises(ValueError, match="does not hold"):
        other.load_state(tmp_path / "nowhere", with_optimizer=True)
    with pytest.raises(ValueError, match="rank"):
        FakeTrainerEngine(MODEL, lora_rank=8).load_state(tmp_path, with_optimizer=True)
    with pytest.raises(ValueError, match="base model"):
        FakeTrainerEngine("other/model", lora_rank=4).load_state(tmp_path, with_optimizer=True)


# ---- (7) AdamW ---------------------------------------------------------------------------------

def ref_adamw(params: AdamParams, weights, grads_per_step):
    """torch.optim.AdamW after clip_grad_norm_, written out plainly."""
    p = [w.copy() for w in weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    norms = []
    for t, grads in enumerate(grads_per_step, start=1):
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        norms.append(norm)
        if params.grad_clip_norm > 0:
            grads = [g * min(1.0, params.grad_clip_norm / (norm + 1e-6)) for g in grads]
        for i, g in enumerate(grads):
            p[i] = p[i] * (1 - params.learning_rate * params.weight_decay)
            m[i] = params.beta1 * m[i] + (1 - params.beta1) * g
            v[i] = params.beta2 * v[i] + (1 - params.beta2) * g * g
            m_hat = m[i] / (1 - params.beta1 ** t)
            v_hat = v[i] / (1 - params.beta2 ** t)
            p[i] = p[i] - params.learning_rate * m_hat / (np.sqrt(v_hat) + params.eps)
    return p, norms


def train_3(params: AdamParams):
    eng = fresh_engine()
    _, datum = paris_datum()
    start, grads, norms = [eng.lora_A.copy(), eng.lora_B.copy()], [], []
    for _ in range(3):
        eng.forward_backward([datum], "cross_entropy", {}, backward=True)
        grads.append([eng.grad_A.copy(), eng.grad_B.copy()])
        metrics = eng.optim_step(params)
        assert metrics["learning_rate:mean"] == params.learning_rate
        norms.append(metrics["grad_norm:mean"])
    ref, ref_norms = ref_adamw(params, start, grads)
    # The engine's steps (fed its own gradients) follow torch's AdamW.
    np.testing.assert_allclose(eng.lora_A, ref[0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(eng.lora_B, ref[1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-12)
    return eng.lora_A, eng.lora_B, norms


BASE = dict(learning_rate=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
VARIANTS = [("learning_rate", 0.02), ("beta1", 0.5), ("beta2", 0.5), ("eps", 1e-1),
            ("weight_decay", 0.5), ("grad_clip_norm", 1e-3)]


@pytest.mark.parametrize("field,value", VARIANTS)
def test_every_adam_field_matters(field, value):
    a0, b0, n0 = train_3(AdamParams(**BASE))
    a1, b1, n1 = train_3(AdamParams(**{**BASE, field: value}))
    assert max(np.abs(a1 - a0).max(), np.abs(b1 - b0).max()) > 1e-6
    if field == "grad_clip_norm":
        assert n0[0] == n1[0] > value  # the pre-clip norm is reported, and it was clipped


# ---- (8) sampler ---------------------------------------------------------------------------------

def gen(sampler, **kw):
    return asyncio.run(sampler.generate(GenerationRequest(**kw)))


def test_sampler_seeds():
    s = FakeSamplerEngine(MODEL)
    prompt = TOK.encode("Hello")
    a = gen(s, prompt=prompt, max_tokens=20, seed=4, n=3, stop_at_eos=False)
    b = gen(s, prompt=prompt, max_tokens=20, seed=4, n=3, stop_at_eos=False)
    c = gen(s, prompt=prompt, max_tokens=20, seed=5, n=3, stop_at_eos=False)
    assert [q.tokens for q in a.sequences] == [q.tokens for q in b.sequences]
    assert [q.logprobs for q in a.sequences] == [q.logprobs for q in b.sequences]
    assert [q.tokens for q in a.sequences] != [q.tokens for q in c.sequences]
    assert len({tuple(q.tokens) for q in a.sequences}) == 3  # n draws differ
    assert all(len(q.tokens) == 20 and q.finish_reason == "length" for q in a.sequences)
    # Unseeded: successive calls differ, but a fresh engine replays the same series.
    run1 = [gen(s2, prompt=prompt, max_tokens=10).sequences[0].tokens for s2 in [FakeSamplerEngine(MODEL)] * 2]
    run2 = [gen(s2, prompt=prompt, max_tokens=10).sequences[0].tokens for s2 in [FakeSamplerEngine(MODEL)] * 2]
    assert run1 == run2 and run1[0] != run1[1]
    assert gen(s, prompt=prompt, max_tokens=0).sequences[0].tokens == []


def test_sampler_logprobs_follow_temperature():
    s = FakeSamplerEngine(MODEL)
    w0 = base_table(MODEL, V)
    prompt = TOK.encode("Hi")
    for temperature in (0.5, 1.0, 2.0):
        seq = gen(s, prompt=prompt, max_tokens=8, seed=1, temperature=temperature, stop_at_eos=False).sequences[0]
        prev = prompt[-1]
        for tok, lp in zip(seq.tokens, seq.logprobs):
            z = w0[prev] / temperature
            assert lp == pytest.approx(z[tok] - np.log(np.exp(z - z.max()).sum()) - z.max(), rel=1e-9)
            prev = tok


def test_greedy_top_k_1_and_tiny_top_p_agree():
    s = FakeSamplerEngine(MODEL)
    prompt = TOK.encode("Once upon a time")
    greedy = gen(s, prompt=prompt, max_tokens=15, temperature=0.0, stop_at_eos=False).sequences[0]
    top1 = gen(s, prompt=prompt, max_tokens=15, top_k=1, seed=3, stop_at_eos=False).sequences[0]
    tiny_p = gen(s, prompt=prompt, max_tokens=15, top_p=1e-9, seed=4, stop_at_eos=False).sequences[0]
    assert greedy.tokens == top1.tokens == tiny_p.tokens
    assert greedy.logprobs == top1.logprobs  # temperature-1 logprobs in both cases
    # top_k restricts the support to the k most likely tokens.
    row = base_table(MODEL, V)[prompt[-1]]
    top3 = set(np.argsort(-row)[:3].tolist())
    firsts = {q.tokens[0] for q in gen(s, prompt=prompt, max_tokens=1, top_k=3, seed=0, n=30).sequences}
    assert firsts <= top3 and len(firsts) > 1


def test_stop_strings_and_stop_tokens(paris):
    _, sampler, prompt, _, _ = paris
    seq = gen(sampler, prompt=prompt, max_tokens=12, temperature=0.0, adapter=1, stop=["ri"]).sequences[0]
    assert seq.tokens == TOK.encode(" Pari") and seq.text == " Pa" and seq.finish_reason == "stop"
    seq = gen(sampler, prompt=prompt, max_tokens=12, temperature=0.0, adapter=1,
              stop_token_ids=[ord("r")]).sequences[0]
    assert seq.tokens == TOK.encode(" Par") and seq.text == " Par" and seq.finish_reason == "stop"
    seq = gen(sampler, prompt=prompt, max_tokens=8, temperature=0.0, adapter=1, stop_at_eos=False).sequences[0]
    assert seq.tokens[:7] == TOK.encode(" Paris") + [TOK.eos_token_id] and len(seq.tokens) == 8
    assert seq.finish_reason == "length"
    seq = gen(sampler, prompt=prompt, max_tokens=3, temperature=0.0, adapter=1).sequences[0]
    assert seq.text == " Pa" and seq.finish_reason == "length"


def test_prompt_logprobs_match_trainer(paris):
    eng, sampler, prompt, _, _ = paris
    tokens = prompt + TOK.encode(" Paris")
    out = eng.forward_backward([make_datum(tokens[:-1], tokens[1:])], "cross_entropy", {}, backward=False)
    trainer_lps = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    res = gen(sampler, prompt=tokens, max_tokens=1, adapter=1, prompt_logprobs=5)
    assert res.prompt_logprobs[0] is None and res.prompt_topk[0] is None
    np.testing.assert_allclose(res.prompt_logprobs[1:], trainer_lps, rtol=1e-6)
    for pos, top in enumerate(res.prompt_topk[1:], start=1):
        assert len(top) == 5
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        assert values[0] >= res.prompt_logprobs[pos]
    # The base model (version 0) matches a fresh adapter on the trainer.
    fresh = FakeTrainerEngine(MODEL, lora_rank=8, seed=3)
    base_lps = fresh.forward_backward([make_datum(tokens[:-1], tokens[1:])], "cross_entropy", {},
                                      backward=False).loss_fn_outputs[0]["logprobs"].to_numpy()
    res0 = gen(sampler, prompt=tokens, max_tokens=0, prompt_logprobs=0)
    np.testing.assert_allclose(res0.prompt_logprobs[1:], base_lps, rtol=1e-6)
    assert res0.prompt_topk is None
    assert gen(sampler, prompt=tokens, max_tokens=0).prompt_logprobs is None


def test_adapter_versions(paris, tmp_path):
    _, sampler, prompt, _, adapter = paris
    with pytest.raises(KeyError):
        gen(sampler, prompt=prompt, max_tokens=1, adapter=9)
    other = FakeSamplerEngine("other/model")
    with pytest.raises(ValueError, match="base model"):
        asyncio.run(other.load_adapter(1, adapter))
    with pytest.raises(ValueError, match="not a fake-engine adapter"):
        asyncio.run(other.load_adapter(1, tmp_path))
    asyncio.run(sampler.load_adapter(2, adapter))
    asyncio.run(sampler.unload_adapter(2))
    with pytest.raises(KeyError):
        gen(sampler, prompt=prompt, max_tokens=1, adapter=2)
    assert sampler.eos_token_ids == [TOK.eos_token_id] and sampler.vocab_size == V
    assert sampler.decode(TOK.encode("héllo")) == "héllo"


# ---- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer():
    tok = load_fake_tokenizer()
    assert isinstance(tok, FakeTokenizer) and len(tok) == tok.vocab_size == 259
    text = "héllo wörld ✓"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True)
    assert tok.decode([104, 105, tok.eos_token_id]) == "hi<|endoftext|>"
    assert tok.decode([104, 105, tok.eos_token_id], skip_special_tokens=True) == "hi"
    assert tok.pad_token_id == tok.eos_token_id and tok.bos_token_id is None
    assert tok.convert_ids_to_tokens([65, 10, 256]) == ["A", "<0x0A>", "<|endoftext|>"]
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == 257 and ids.count(257) == 2 and ids.count(258) == 1 and tok.decode(ids) == text
    assert tok.name_or_path == FAKE_TOKENIZER_ID
    with pytest.raises(ValueError):
        load_fake_tokenizer("gpt2")


# ---- runs, top-k, non-finite guards, vocabulary ----------------------------------------------

def test_runs_are_isolated_and_each_equals_itself_alone():
    """Interleaving two runs on one engine gives each run exactly the bits it has alone."""
    x = make_datum([1, 2, 3, 4], [2, 3, 4, 5])
    y = make_datum([9, 8, 7], [8, 7, 6])
    params = AdamParams(learning_rate=0.02)

    def alone(rank, seed, datum):
        eng = FakeTrainerEngine(MODEL, lora_rank=rank, seed=seed)
        losses = []
        for _ in range(3):
            losses.append(eng.forward_backward([datum], "cross_entropy", {}, backward=True).loss)
            eng.optim_step(params)
        return losses, eng.lora_A.copy(), eng.step

    shared = FakeTrainerEngine(MODEL, lora_rank=2, seed=0)
    shared.init_lora(4, 1, run="a")
    shared.init_lora(8, 2, run="b")
    assert set(shared.runs) == {"default", "a", "b"} and shared.lora_rank == 8
    got = {"a": [], "b": []}
    for _ in range(3):
        for run, datum in (("a", x), ("b", y)):
            shared.use_run(run)
            got[run].append(shared.forward_backward([datum], "cross_entropy", {}, backward=True).loss)
        for run in ("a", "b"):
            shared.use_run(run)
            shared.optim_step(params)
    for run, rank, seed, datum in (("a", 4, 1, x), ("b", 8, 2, y)):
        losses, lora_a, step = alone(rank, seed, datum)
        shared.use_run(run)
        assert got[run] == losses and np.array_equal(shared.lora_A, lora_a) and shared.step == step == 3
        assert shared.lora_rank == rank
    shared.use_run("default")
    assert shared.step == 0 and shared.lora_rank == 2
    shared.close_run("a")
    with pytest.raises(LookupError, match="'a'"):
        shared.use_run("a")
    assert set(shared.runs) == {"default", "b"}


def test_top_k_logprobs_are_the_best_next_tokens():
    eng = fresh_engine()
    datum = make_datum([1, 2, 3], [2, 3, 4])
    out = eng.forward_backward([datum], "cross_entropy", {}, backward=False, top_k_logprobs=5)
    ids = out.loss_fn_outputs[0]["topk_token_ids"].to_numpy()
    lps = out.loss_fn_outputs[0]["topk_logprobs"].to_numpy()
    assert ids.shape == lps.shape == (3, 5) and ids.dtype == np.int64 and lps.dtype == np.float32
    for pos, prev in enumerate([1, 2, 3]):
        ref = [ref_token_lp(eng._w0, eng.lora_A, eng.lora_B, prev, t) for t in range(V)]
        assert list(ids[pos]) == list(np.argsort(-np.asarray(ref), kind="stable")[:5])
        np.testing.assert_allclose(lps[pos], [ref[t] for t in ids[pos]], rtol=1e-6)
    assert "topk_token_ids" not in eng.forward_backward([datum], "cross_entropy", {}, backward=False).loss_fn_outputs[0]


def test_non_finite_loss_gradient_or_step_changes_nothing():
    from loops_core.engine import NonFiniteError

    eng = fresh_engine()
    good = make_datum([1, 2, 3], [2, 3, 4])
    eng.forward_backward([good], "cross_entropy", {}, backward=True)
    before = [x.copy() for x in (eng.lora_A, eng.lora_B, eng.grad_A, eng.grad_B, *eng._m, *eng._v)]
    bad = make_datum([1, 2, 3], [2, 3, 4], weights=[1.0, float("inf"), 1.0])
    with pytest.raises(NonFiniteError, match="loss"):
        eng.forward_backward([bad], "cross_entropy", {}, backward=True)
    with pytest.raises(NonFiniteError, match="nothing was changed"):
        eng.optim_step(AdamParams(learning_rate=1e308, weight_decay=1e10))
    after = [eng.lora_A, eng.lora_B, eng.grad_A, eng.grad_B, *eng._m, *eng._v]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)) and eng.step == 0 and eng._adam_step == 0


def test_sampler_topk_and_target_prompt_logprobs(paris):
    eng, sampler, prompt, _, _ = paris
    res = gen(sampler, prompt=prompt, max_tokens=4, adapter=1, seed=5, temperature=0.7, topk_sample_logprobs=3,
              target_prompt_tokens=[[prompt[i + 1], -1] for i in range(len(prompt) - 1)])
    seq = res.sequences[0]
    assert len(seq.topk) == len(seq.tokens)
    for tok, lp, top in zip(seq.tokens, seq.logprobs, seq.topk):
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][1] >= lp  # the best of the distribution the token was drawn from
    with_plp = gen(sampler, prompt=prompt, max_tokens=0, adapter=1, prompt_logprobs=0)
    assert [row[0] for row in res.target_prompt_logprobs] == with_plp.prompt_logprobs[1:]
    assert all(row[1] == 0.0 for row in res.target_prompt_logprobs)
    assert res.prompt_cache_hit_tokens == 0 and gen(sampler, prompt=prompt, max_tokens=1).sequences[0].topk is None


def test_vocabulary_comes_from_the_base_model_when_it_resolves(tmp_path):
    from loops_backends.fake.tokenizer import base_vocabulary

    assert base_vocabulary("no/such-model-anywhere")[1] == FAKE_TOKENIZER_ID
    assert base_vocabulary(str(tmp_path))[1] == FAKE_TOKENIZER_ID  # a directory without a tokenizer
    pytest.importorskip("transformers")
    pytest.importorskip("torch")  # builds the tiny model the first time
    from loops_core.tokenizers import load_tokenizer

    eng = FakeTrainerEngine("loops/tiny-qwen3", lora_rank=2)
    hf = load_tokenizer("loops/tiny-qwen3")
    assert eng.tokenizer_id == "loops/tiny-qwen3" and eng.vocab_size == len(hf) > V
    sampler = FakeSamplerEngine("loops/tiny-qwen3")
    ids = hf.encode(" Paris is", add_special_tokens=False)
    out = gen(sampler, prompt=ids, max_tokens=3, seed=1, stop_at_eos=False)
    assert sampler.vocab_size == eng.vocab_size and out.sequences[0].text == hf.decode(out.sequences[0].tokens,
                                                                                        skip_special_tokens=True)
