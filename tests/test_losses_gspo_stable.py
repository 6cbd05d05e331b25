"""gspo and stable_reinforce: the fake engine against a token-by-token reference (value and finite
differences), the torch losses against float64 references and against the fake engine, and the
request validation (provenance spans, masks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loops_backends.fake.engine import FakeTrainerEngine, base_table, log_softmax_rows, logit_table
from loops_backends.fake.losses import LOSS_GRADIENTS, Row
from loops_backends.fake.tokenizer import load_fake_tokenizer
from loops_core.errors import InvalidRequestError
from loops_core.losses import LOSSES, sampled_mask, validate_batch
from loops_core.types import Datum, ModelInput, PromptProvenanceSpan, SampledProvenanceSpan, TensorData

V = load_fake_tokenizer().vocab_size
MODEL = "test/gspo-model"
GSPO_CFG = {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}


def token_lp(w0, a, b, prev, target) -> float:
    z = w0[prev] + a[prev] @ b
    zmax = z.max()
    return float(z[target] - (zmax + math.log(np.exp(z - zmax).sum())))


def datum(x, targets, **inputs) -> Datum:
    lfi = {"target_tokens": TensorData.from_numpy(np.asarray(targets, dtype=np.int64))}
    lfi.update({k: TensorData.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in inputs.items()})
    return Datum(model_input=ModelInput.from_ints([int(t) for t in x]), loss_fn_inputs=lfi)


def with_spans(d: Datum, prompt_len: int = 3) -> Datum:
    n = d.model_input.length
    return d.with_provenance(
        model_input=[PromptProvenanceSpan(sequence_id="s1", length=prompt_len),
                     SampledProvenanceSpan(sequence_id="s1", length=n - prompt_len)],
        loss_fn_inputs=[PromptProvenanceSpan(sequence_id="s1", offset=1, length=prompt_len - 1),
                        SampledProvenanceSpan(sequence_id="s1", length=n - prompt_len + 1)])


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)  # inputs travel as float32


def reference(loss_fn, datums, cfg, w0, a, b, frozen=None):
    """The table in loops_core.losses, written out position by position (``frozen``: per-datum
    lp lists used for the detached ratio of stable_reinforce). Returns (loss, lps, metrics)."""
    total, lps_all, ratios, clipped, kls = 0.0, [], [], [], []
    for i, d in enumerate(datums):
        x = d.model_input.to_ints()
        tg = d.loss_fn_inputs["target_tokens"].to_numpy()
        inp = {k: f32(v.to_numpy()) for k, v in d.loss_fn_inputs.items() if k != "target_tokens"}
        act = [t >= 0 for t in tg]
        lp = [token_lp(w0, a, b, x[t], tg[t]) if act[t] else 0.0 for t in range(len(x))]
        lps_all.append(lp)
        w = inp.get("weights", np.ones(len(x)))
        if loss_fn == "gspo":
            lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
            mask = inp.get("sequence_ratio_mask", np.ones(len(x)))
            num = den = 0.0
            for t in range(len(x)):
                if act[t]:
                    num += mask[t] * (lp[t] - inp["logprobs"][t])
                    den += mask[t]
            s = math.exp(num / den) if den else 1.0
            if den:
                ratios.append(s)
                clipped.append(s < lo or s > hi)
            for t in range(len(x)):
                if act[t]:
                    adv = inp["advantages"][t]
                    total += -w[t] * min(s * adv, min(max(s, lo), hi) * adv)
        else:  # stable_reinforce: only positions the spans mark as sampled
            sampled = [isinstance(sp, SampledProvenanceSpan) for sp in d.loss_fn_input_spans for _ in range(sp.length)]
            for t in range(len(x)):
                if not (act[t] and sampled[t]):
                    continue
                q, adv = inp["logprobs"][t], inp["advantages"][t]
                r = math.exp(lp[t] - q)
                r_sg = math.exp((frozen[i][t] if frozen else lp[t]) - q)
                k3 = r - 1 - (lp[t] - q)
                total += w[t] * (-r_sg * adv * lp[t] + cfg["kl_coeff"] * k3)
                ratios.append(r)
                kls.append(k3)
    metrics = {"ratio:mean": float(np.mean(ratios)) if ratios else 0.0}
    if loss_fn == "gspo":
        metrics["clip_fraction:mean"] = float(np.mean(clipped)) if clipped else 0.0
    else:
        metrics["sampler_kl:mean"] = float(np.mean(kls))
    return total, lps_all, metrics


def make_datums(loss_fn, rng, w0, a, b, *, spread=0.3):
    out = []
    for k in range(3):
        n = 8
        x = rng.integers(0, 40, n)
        targets = rng.integers(0, V, n)
        targets[2] = -100
        true = np.array([token_lp(w0, a, b, p, t) if t >= 0 else 0.0 for p, t in zip(x, targets)])
        inputs = {"logprobs": true + rng.normal(0, spread, n), "advantages": rng.normal(0, 1, n),
                  "weights": rng.uniform(0.5, 1.5, n)}
        if loss_fn == "gspo" and k != 1:  # datum 1 keeps the default mask (every active position)
            mask = np.ones(n)
            mask[:3] = 0.0  # the "prompt" stays out of the sequence ratio
            inputs["sequence_ratio_mask"] = mask
        d = datum(x, targets, **inputs)
        out.append(with_spans(d) if loss_fn == "stable_reinforce" else d)
    return out


def engine():
    eng = FakeTrainerEngine(MODEL, lora_rank=3, seed=2)
    eng.lora_B = np.random.default_rng(5).normal(0, 0.5, eng.lora_B.shape)
    return eng


# ---- fake engine ------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn,cfg,spread", [
    ("gspo", GSPO_CFG, 0.3),                                         # every ratio clipped or not, mixed
    ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, 0.05),
    ("stable_reinforce", {"kl_coeff": 0.01}, 0.3),
    ("stable_reinforce", {"kl_coeff": 0.7}, 0.3),                    # a KL term that matters
])
def test_fake_value_metrics_and_finite_difference_gradient(loss_fn, cfg, spread):
    rng = np.random.default_rng(11)
    eng = engine()
    w0, a0, b0 = base_table(MODEL, V), eng.lora_A.copy(), eng.lora_B.copy()
    datums = make_datums(loss_fn, rng, w0, a0, b0, spread=spread)
    validate_batch(datums, loss_fn, cfg)  # a valid request

    out = eng.forward_backward(datums, loss_fn, {**LOSSES[loss_fn].config, **cfg}, backward=True)
    ga, gb = eng.grad_A.copy(), eng.grad_B.copy()
    ref, lps, metrics = reference(loss_fn, datums, cfg, w0, a0, b0)
    assert out.loss == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert set(out.metrics) == {"loss:sum", "num_tokens:sum", *metrics}
    for k, v in metrics.items():
        assert out.metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for o, lp in zip(out.loss_fn_outputs, lps):
        got = o["logprobs"].to_numpy()
        assert np.isnan(got[2]) and np.allclose(np.delete(got, 2), np.delete(lp, 2), rtol=1e-6)

    if loss_fn == "stable_reinforce":  # sg(r) is a constant of the gradient: freeze it
        def f(a, b):
            return reference(loss_fn, datums, cfg, w0, a, b, frozen=lps)[0]
    else:
        def f(a, b):
            eng.lora_A, eng.lora_B = a, b
            return eng.forward_backward(datums, loss_fn, {**LOSSES[loss_fn].config, **cfg}, backward=False).loss
    drng = np.random.default_rng(3)
    for use_a, use_b in [(1, 0), (0, 1), (1, 1)]:
        da, db = use_a * drng.normal(size=a0.shape), use_b * drng.normal(size=b0.shape)
        eps = 1e-6
        fd = (f(a0 + eps * da, b0 + eps * db) - f(a0 - eps * da, b0 - eps * db)) / (2 * eps)
        analytic = float((ga * da).sum() + (gb * db).sum())
        assert abs(analytic) > 1e-4
        assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-8)


def test_gspo_clipped_sequences_get_no_gradient():
    """With a clip range of +-1e-9, every sequence whose ratio moved is clipped on the side where the
    min picks the constant: those datums contribute no gradient."""
    rng = np.random.default_rng(4)
    eng = engine()
    w0 = base_table(MODEL, V)
    x = rng.integers(0, 40, 6)
    targets = rng.integers(0, V, 6)
    true = np.array([token_lp(w0, eng.lora_A, eng.lora_B, p, t) for p, t in zip(x, targets)])
    d = datum(x, targets, logprobs=true - 0.5, advantages=np.ones(6))  # s = e^0.5 > hi, A > 0: clipped
    out = eng.forward_backward([d], "gspo", {"clip_low_threshold": 1 - 1e-9, "clip_high_threshold": 1 + 1e-9},
                               backward=True)
    assert out.metrics["clip_fraction:mean"] == 1.0
    assert not eng.grad_A.any() and not eng.grad_B.any()


def test_stable_reinforce_leaves_prompt_positions_alone():
    """Prompt positions carry logprob 0 and advantage 0 (Tinker's convention): no KL term there."""
    eng = engine()
    d = with_spans(datum([5, 6, 7, 8, 9], [6, 7, 8, 9, 10], logprobs=[0, 0, -20, -20, -20], advantages=[0, 0, 1, 1, 1]))
    out = eng.forward_backward([d], "stable_reinforce", {"kl_coeff": 1.0}, backward=True)
    assert sampled_mask(d) == [0, 0, 1, 1, 1]
    used_rows = eng.grad_A[[5, 6]]  # inputs 5, 6 predict the prompt targets only
    assert not used_rows.any() and eng.grad_A[[7, 8, 9]].any()
    assert out.metrics["ratio:mean"] > 1e3  # over the three sampled positions only (prompt ones are < 1)


def test_validation_of_the_new_losses():
    d = datum([1, 2, 3, 4], [2, 3, 4, 5], logprobs=[0.0] * 4, advantages=[1.0] * 4)
    with pytest.raises(InvalidRequestError, match="provenance") as e:
        validate_batch([d], "stable_reinforce", None)
    assert e.value.field == "data[0].model_input_spans"
    validate_batch([with_spans(d, prompt_len=2)], "stable_reinforce", {"kl_coeff": 0.1})
    with pytest.raises(ValueError, match="tile"):
        d.with_provenance(model_input=[SampledProvenanceSpan(sequence_id="a", length=3)],
                          loss_fn_inputs=[SampledProvenanceSpan(sequence_id="a", length=4)])
    # gspo: a mask of the right length is accepted; per-token clip thresholds are not (one ratio per datum)
    validate_batch([datum([1, 2, 3], [2, 3, 4], logprobs=[0] * 3, advantages=[1] * 3,
                          sequence_ratio_mask=[0, 1, 1])], "gspo", None)
    with pytest.raises(InvalidRequestError, match="sequence_ratio_mask"):
        validate_batch([datum([1, 2, 3], [2, 3, 4], logprobs=[0] * 3, advantages=[1] * 3,
                              sequence_ratio_mask=[0, 1])], "gspo", None)
    with pytest.raises(InvalidRequestError, match="clip_low_threshold"):
        validate_batch([datum([1, 2], [2, 3], logprobs=[0] * 2, advantages=[1] * 2,
                              clip_low_threshold=[0.9] * 2)], "gspo", None)
    with pytest.raises(InvalidRequestError, match="kl_coeff"):
        validate_batch([d], "gspo", {"kl_coeff": 0.1})
    # spans travel through JSON and back
    j = with_spans(d, 2).model_dump(mode="json")
    assert [s["type"] for s in j["model_input_spans"]] == ["prompt", "sampled"]
    assert Datum.model_validate(j) == with_spans(d, 2)
    assert "model_input_spans" not in d.model_dump(mode="json")


# ---- torch losses -------------------------------------------------------------------------------

def _torch_batch(torch, datums, lps, dtype):
    """A LossInputs packed like the trainer's ``pack``: flat positions, 0 where inactive."""
    from loops_backends.local_gpu.losses_torch import LossInputs

    cols = {k: [] for k in ("lp", "q", "adv", "w", "mask", "sampled", "active", "datum")}
    has_mask = any("sequence_ratio_mask" in d.loss_fn_inputs for d in datums)  # pack fills 1s where absent
    for i, (d, lp) in enumerate(zip(datums, lps)):
        tg = d.loss_fn_inputs["target_tokens"].to_numpy()
        act = tg >= 0
        get = lambda k, default: d.loss_fn_inputs[k].to_numpy() if k in d.loss_fn_inputs else default  # noqa: E731
        cols["lp"] += list(np.where(act, lp, 0.0))
        cols["q"] += list(np.where(act, get("logprobs", None), 0.0))
        cols["adv"] += list(np.where(act, get("advantages", None), 0.0))
        cols["w"] += list(np.where(act, get("weights", np.ones(len(tg))), 0.0))
        cols["mask"] += list(np.where(act, get("sequence_ratio_mask", np.ones(len(tg))), 0.0))
        cols["sampled"] += sampled_mask(d)
        cols["active"] += list(act)
        cols["datum"] += [i] * len(tg)
    t = {k: torch.tensor(v, dtype=dtype) for k, v in cols.items() if k not in ("active", "datum")}
    lp = t["lp"].reshape(-1, 1).requires_grad_(True)
    active = torch.tensor(cols["active"])
    return lp, LossInputs(logprobs=lp, active=active.reshape(-1, 1), weights=t["w"].reshape(-1, 1),
                          datum=torch.tensor(cols["datum"]), num_datums=len(datums),
                          sampler_logprobs=t["q"], advantages=t["adv"],
                          sequence_ratio_mask=t["mask"] if has_mask else None,
                          sampled_mask=t["sampled"] if d.loss_fn_input_spans is not None else None)


def _torch_reference(torch, loss_fn, datums, lps, cfg):
    """Float64, datum by datum, with autograd: an independent spelling of the same formulas."""
    leaves, total = [], torch.zeros((), dtype=torch.float64)
    for d, lp in zip(datums, lps):
        tg = torch.tensor(d.loss_fn_inputs["target_tokens"].to_numpy())
        act = tg >= 0
        x = torch.tensor(np.where(act.numpy(), lp, 0.0), dtype=torch.float64, requires_grad=True)
        leaves.append(x)
        q = torch.tensor(f32(d.loss_fn_inputs["logprobs"].to_numpy()))
        adv = torch.tensor(f32(d.loss_fn_inputs["advantages"].to_numpy()))
        w = torch.tensor(f32(d.loss_fn_inputs["weights"].to_numpy())) * act
        if loss_fn == "gspo":
            m = (torch.tensor(f32(d.loss_fn_inputs["sequence_ratio_mask"].to_numpy()))
                 if "sequence_ratio_mask" in d.loss_fn_inputs else torch.ones(len(tg), dtype=torch.float64)) * act
            s = torch.exp((m * (x - q)).sum() / m.sum())
            sc = torch.clamp(s, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
            terms = [-w[t] * torch.min(s * adv[t], sc * adv[t]) for t in range(len(tg)) if act[t]]
            total = total + torch.stack(terms).sum()
        else:
            sampled = sampled_mask(d)
            for t in range(len(tg)):
                if act[t] and sampled[t]:
                    r = torch.exp(x[t] - q[t])
                    total = total + w[t] * (-r.detach() * adv[t] * x[t]
                                            + cfg["kl_coeff"] * (r - 1 - (x[t] - q[t])))
    total.backward()
    return float(total.detach()), np.concatenate([x.grad.numpy() for x in leaves])


@pytest.mark.parametrize("loss_fn,cfg", [("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
                                         ("gspo", GSPO_CFG),
                                         ("stable_reinforce", {"kl_coeff": 0.3})])
def test_torch_losses_match_float64_reference_and_fake_engine(loss_fn, cfg):
    torch = pytest.importorskip("torch")

    from loops_backends.local_gpu.losses_torch import LOSS_FUNCTIONS, combine_stats

    rng = np.random.default_rng(21)
    eng = engine()
    w0 = base_table(MODEL, V)
    datums = make_datums(loss_fn, rng, w0, eng.lora_A, eng.lora_B, spread=0.05)
    logp = log_softmax_rows(logit_table(w0, eng.lora_A, eng.lora_B))
    rows = [Row(d, logp) for d in datums]
    lps = [r.lp for r in rows]

    ref_loss, ref_grad = _torch_reference(torch, loss_fn, datums, lps, cfg)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        lp, batch = _torch_batch(torch, datums, lps, dtype)
        out = LOSS_FUNCTIONS[loss_fn](batch, cfg)
        out.loss.backward()
        assert float(out.loss.detach()) == pytest.approx(ref_loss, rel=tol, abs=tol)
        assert np.allclose(lp.grad.reshape(-1).double().numpy(), ref_grad, rtol=tol * 10, atol=tol)

    # The fake engine's loss, dL/dlp and metrics agree with the torch loss on the same inputs.
    fake_losses, fake_coeffs, fake_metrics = LOSS_GRADIENTS[loss_fn](rows, cfg)
    lp, batch = _torch_batch(torch, datums, lps, torch.float64)
    out = LOSS_FUNCTIONS[loss_fn](batch, cfg)
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(sum(fake_losses), rel=1e-10)
    assert np.allclose(lp.grad.reshape(-1).numpy(), np.concatenate(fake_coeffs), rtol=1e-9, atol=1e-12)
    metrics = combine_stats([out.stats], cfg)
    for k, v in fake_metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_torch_trainer_packs_sequence_ratio_mask():
    pytest.importorskip("torch")
    import torch

    from loops_backends.local_gpu.trainer import pack

    d = datum([1, 2, 3], [2, 3, -100], logprobs=[0, 0, 0], advantages=[1, 1, 1], sequence_ratio_mask=[0, 1, 1])
    plain = datum([4, 5], [5, 6], logprobs=[0, 0], advantages=[1, 1])  # default mask: every position
    batch = pack([d, plain], "gspo", dict(LOSSES["gspo"].config), torch.device("cpu"))
    assert batch.inputs["sequence_ratio_mask"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]  # 0 where inactive
