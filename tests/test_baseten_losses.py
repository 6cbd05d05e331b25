"""The losses the published baseten-loops client documents: dppo's formula and cispo's defaults.

dppo's torch implementation is checked against the formula in ``loops_core.losses``, written
out here a second time in numpy with its gradient derived by hand, on values chosen so that every
branch of the trust-region mask is taken.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from loops_core.errors import InvalidRequestError
from loops_core.losses import LOSSES, resolve_config, validate_batch
from loops_core.types import Datum, ModelInput, TensorData

DPPO_DEFAULTS = {"dppo_mask_high": 0.2, "dppo_mask_low": 0.2, "adv_tau": 1.0, "kl_tau": 1e-3}


def test_documented_defaults():
    # training_client.forward_backward's docstring in baseten-loops 0.32.0
    assert dict(LOSSES["dppo"].config) == DPPO_DEFAULTS
    assert dict(LOSSES["cispo"].config) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert dict(LOSSES["cispo"].config) == dict(LOSSES["ppo"].config)
    assert LOSSES["dppo"].required == ("target_tokens", "logprobs", "advantages")


def _datum(n: int = 4, **extra: list[float]) -> Datum:
    inputs = {"target_tokens": TensorData(data=[1] * n, dtype="int64", shape=[n]),
              "logprobs": TensorData(data=[-1.0] * n, dtype="float32", shape=[n]),
              "advantages": TensorData(data=[1.0] * n, dtype="float32", shape=[n])}
    inputs.update({k: TensorData(data=v, dtype="float32", shape=[n]) for k, v in extra.items()})
    return Datum(model_input=ModelInput.from_ints([2] * n), loss_fn_inputs=inputs)


def test_dppo_requests_are_validated():
    cfg = validate_batch([_datum(weights=[1.0, 0.0, 1.0, 1.0])], "dppo", {"kl_tau": 0.01})
    assert cfg["kl_tau"] == 0.01 and cfg["dppo_mask_high"] == 0.2
    with pytest.raises(InvalidRequestError, match="clip_low_threshold") as exc:
        resolve_config("dppo", {"clip_low_threshold": 0.5})
    assert exc.value.field == "loss_fn_config.clip_low_threshold"
    with pytest.raises(InvalidRequestError, match="advantages"):
        validate_batch([Datum(model_input=ModelInput.from_ints([2, 2]), loss_fn_inputs={
            "target_tokens": TensorData(data=[1, 1], dtype="int64", shape=[2]),
            "logprobs": TensorData(data=[-1.0, -1.0], dtype="float32", shape=[2])})], "dppo", None)


def _reference(lp, q, adv, w, active, cfg):
    """The loops_core.losses table's dppo, in numpy: (loss, dloss/dlp, mask)."""
    moved = np.exp(lp) - np.exp(q)
    masked = np.where(adv > 0, moved > cfg["dppo_mask_high"], moved < -cfg["dppo_mask_low"]) & active
    keep = (~masked & active).astype(np.float64)
    log_r = np.where(active, lp - q, 0.0)
    r = np.exp(log_r)
    loss = float((w * (-keep * cfg["adv_tau"] * adv * r + cfg["kl_tau"] * log_r ** 2)).sum())
    grad = w * (-keep * cfg["adv_tau"] * adv * r + 2 * cfg["kl_tau"] * log_r) * active
    return loss, grad, masked


@pytest.mark.parametrize("cfg", [DPPO_DEFAULTS, {"dppo_mask_high": 0.05, "dppo_mask_low": 0.3, "adv_tau": 0.7,
                                                 "kl_tau": 0.05}])
def test_dppo_torch_matches_the_formula(cfg):
    torch = pytest.importorskip("torch")
    from loops_backends.local_gpu.losses_torch import LOSS_FUNCTIONS, LossInputs, combine_stats

    # probabilities: trainer vs sampler. Rows: up a lot (A>0: masked), up a little (A>0: kept),
    # down a lot (A<0: masked), down a lot (A>0: kept), up a lot (A<0: kept), inactive, A = 0.
    p = np.array([0.7, 0.35, 0.1, 0.1, 0.7, 0.5, 0.4])
    ps = np.array([0.3, 0.3, 0.6, 0.6, 0.3, 0.5, 0.4])
    adv = np.array([1.0, 2.0, -1.5, 0.5, -1.0, 3.0, 0.0])
    w = np.array([1.0, 0.5, 1.0, 2.0, 1.0, 0.0, 1.0])
    active = np.array([True, True, True, True, True, False, True])
    lp_np, q_np = np.where(active, np.log(p), 0.0), np.where(active, np.log(ps), 0.0)

    lp = torch.tensor(lp_np, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
    b = LossInputs(logprobs=lp, active=torch.tensor(active).reshape(-1, 1),
                   weights=torch.tensor(w, dtype=torch.float64).reshape(-1, 1),
                   datum=torch.zeros(len(p), dtype=torch.int64), num_datums=1,
                   sampler_logprobs=torch.tensor(q_np, dtype=torch.float64),
                   advantages=torch.tensor(adv, dtype=torch.float64))
    out = LOSS_FUNCTIONS["dppo"](b, cfg)
    out.loss.backward()

    want_loss, want_grad, masked = _reference(lp_np, q_np, adv, w, active, cfg)
    assert math.isclose(out.loss.detach().item(), want_loss, rel_tol=1e-9, abs_tol=1e-12)
    np.testing.assert_allclose(lp.grad.numpy().ravel(), want_grad, rtol=1e-9, atol=1e-12)
    metrics = combine_stats([out.stats], cfg)
    assert metrics["mask_fraction:mean"] == pytest.approx(masked.sum() / active.sum())
    assert metrics["num_tokens:sum"] == active.sum()
    if cfg is DPPO_DEFAULTS:  # the chosen rows: up-a-lot with A>0 and down-a-lot with A<0 are dropped
        assert masked.tolist() == [True, False, True, False, False, False, False]
        # a dropped token keeps only the KL gradient: 2 kl_tau (lp - q)
        assert lp.grad[0, 0].item() == pytest.approx(2 * cfg["kl_tau"] * (lp_np[0] - q_np[0]))
