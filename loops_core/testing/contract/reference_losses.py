"""The losses of ``loops_core.losses``, recomputed in plain Python from the logprobs a trainer
returns, so the contract suite checks each engine's loss value, not only that it is finite."""

from __future__ import annotations

import math
from typing import Any, Mapping


def _inputs(datum: Any, key: str, default: float) -> list[float]:
    td = datum.loss_fn_inputs.get(key)
    n = datum.loss_fn_inputs["target_tokens"].shape[0]
    return [float(x) for x in td.tolist()] if td is not None else [default] * n


def _active(datum: Any) -> list[bool]:
    return [t >= 0 for t in datum.loss_fn_inputs["target_tokens"].tolist()]


def rl_loss(loss_fn: str, datum: Any, logprobs: list[float], config: Mapping[str, float]) -> float:
    q, adv, w = _inputs(datum, "logprobs", 0.0), _inputs(datum, "advantages", 0.0), _inputs(datum, "weights", 1.0)
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    total = 0.0
    for on, lp, qt, a, wt in zip(_active(datum), logprobs, q, adv, w):
        if not on:
            continue
        r = math.exp(lp - qt)
        if loss_fn == "importance_sampling":
            term = -r * a
        elif loss_fn == "ppo":
            term = -min(r * a, min(max(r, lo), hi) * a)
        elif loss_fn == "cispo":
            term = -min(max(r, lo), hi) * a * lp
        elif loss_fn == "dro":
            term = -(a * lp - config["beta"] / 2 * (lp - qt) ** 2)
        elif loss_fn == "cross_entropy":
            term = -lp
        else:  # pragma: no cover - the suite asks only for the above
            raise ValueError(loss_fn)
        total += wt * term
    return total


def dpo_loss(chosen: Any, rejected: Any, lp_chosen: list[float], lp_rejected: list[float],
             config: Mapping[str, float]) -> float:
    def score(datum: Any, lps: list[float]) -> tuple[float, float]:
        w, ref = _inputs(datum, "weights", 1.0), _inputs(datum, "ref_logprobs", 0.0)
        on = _active(datum)
        return (sum(wt * lp for o, wt, lp in zip(on, w, lps) if o),
                sum(wt * r for o, wt, r in zip(on, w, ref) if o))

    (sc, sc_ref), (sr, sr_ref) = score(chosen, lp_chosen), score(rejected, lp_rejected)
    m = config["beta"] * ((sc - sc_ref) - (sr - sr_ref))
    ls = config.get("label_smoothing", 0.0)

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    return -(1 - ls) * log_sigmoid(m) - ls * log_sigmoid(-m)
