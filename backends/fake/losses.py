"""The fake engine's losses: each returns per-datum losses, per-target dL/dlp, and extra metrics.

Position ``i`` of a datum conditions on token ``i`` and predicts ``target_tokens[i]``. Gradients are
analytic: each loss gives ``g = dL/dlp`` per target (the trainer turns that into dA and dB).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from loops_core.losses import sampled_mask
from loops_core.types import Datum, TensorData

class Row:
    """One datum, read once: tokens ``x``, targets, the active mask, and ``lp`` (0 where inactive)."""

    def __init__(self, datum: Datum, logp: np.ndarray) -> None:
        self.datum = datum
        self.inputs = datum.loss_fn_inputs
        self.x = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        self.targets = self.inputs["target_tokens"].to_numpy().astype(np.int64)
        self.active = self.targets >= 0
        safe = np.where(self.active, self.targets, 0)
        rows = logp[self.x]  # [n, V]
        # The row index broadcasts over the K targets of [T, K] target_tokens.
        lp = rows[np.arange(len(self.x)).reshape((-1,) + (1,) * (safe.ndim - 1)), safe]
        self.lp = np.where(self.active, lp, 0.0)

    def get(self, key: str, fill: float = 0.0) -> np.ndarray:
        """A per-position float input as float64, ``fill`` where inactive (inputs may be NaN there)."""
        return np.where(self.active, self.inputs[key].to_numpy().astype(np.float64), fill)

    def weights(self) -> np.ndarray:
        if "weights" in self.inputs:
            return self.get("weights")
        return self.active.astype(np.float64)

    def output(self) -> TensorData:
        return TensorData.from_numpy(np.where(self.active, self.lp, np.nan).astype(np.float32))


LossResult = tuple[list[float], list[np.ndarray], dict[str, float]]


def _mean(parts: list[np.ndarray]) -> float:
    # An empty batch (every position masked) reports 0.0 rather than NaN, which JSON lacks.
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return float(flat.mean()) if flat.size else 0.0


def _cross_entropy(rows: list[Row], cfg: dict[str, float]) -> LossResult:
    losses, coeffs = [], []
    for d in rows:
        w = d.weights()
        losses.append(float(-(w * d.lp).sum()))
        coeffs.append(-w)
    return losses, coeffs, {}


def _ratio_loss(kind: str) -> Callable[[list[Row], dict[str, float]], LossResult]:
    """importance_sampling, ppo, cispo and dro: per-token losses of ``lp``, ``q`` and ``A``.

    ``weights``, when given, scale each token's loss (0 drops it), as they do for cross_entropy.
    """

    def loss(rows: list[Row], cfg: dict[str, float]) -> LossResult:
        losses, coeffs, ratios, clipped = [], [], [], []
        for d in rows:
            lp, w, adv = d.lp, d.weights(), d.get("advantages")
            q = np.where(d.active, d.get("logprobs"), lp)  # inactive: ratio 1, no NaN
            r = np.exp(lp - q)
            if kind in ("ppo", "cispo"):
                # Per-token thresholds, when sent, override the config.
                lo, hi = (d.get(k) if k in d.inputs else cfg[k]
                          for k in ("clip_low_threshold", "clip_high_threshold"))
                rc = np.clip(r, lo, hi)
                clipped.append(((r < lo) | (r > hi))[d.active].astype(np.float64))
            if kind == "importance_sampling":
                per, g = -r * adv, -r * adv  # d(-r A)/dlp = -r A, as dr/dlp = r
            elif kind == "ppo":
                # The min picks the unclipped term (gradient -r A) or the clipped one (constant).
                unclipped = r * adv <= rc * adv
                per, g = -np.minimum(r * adv, rc * adv), np.where(unclipped, -r * adv, 0.0)
            elif kind == "cispo":
                per, g = -rc * adv * lp, -rc * adv  # the clipped ratio is a constant (sg)
            else:  # dro
                beta = cfg["beta"]
                per = -(adv * lp - beta / 2 * (lp - q) ** 2)
                g = -(adv - beta * (lp - q))
            losses.append(float((w * per).sum()))
            coeffs.append(w * g)
            ratios.append(r[d.active])
        metrics = {"ratio:mean": _mean(ratios)}
        if kind in ("ppo", "cispo"):
            metrics["clip_fraction:mean"] = _mean(clipped)
        return losses, coeffs, metrics

    return loss


def _dppo(rows: list[Row], cfg: dict[str, float]) -> LossResult:
    """``sum_t w_t (-(1 - M_t) adv_tau A_t r_t + kl_tau (lp_t - q_t)^2)``; ``M_t`` (a constant) drops a
    token whose probability moved past the bound in its advantage's direction. dL/dlp is
    ``w_t (-(1 - M_t) adv_tau A_t r_t + 2 kl_tau (lp_t - q_t))``."""
    hi, lo, tau, kl = cfg["dppo_mask_high"], cfg["dppo_mask_low"], cfg["adv_tau"], cfg["kl_tau"]
    losses, coeffs, ratios, masked_parts = [], [], [], []
    for d in rows:
        lp, w, adv = d.lp, d.weights(), d.get("advantages")
        q = np.where(d.active, d.get("logprobs"), lp)  # inactive: ratio 1, no term
        r = np.exp(lp - q)
        moved = np.exp(lp) - np.exp(q)
        masked = np.where(adv > 0, moved > hi, moved < -lo) & d.active
        keep = (~masked & d.active).astype(np.float64)
        losses.append(float((w * (-keep * tau * adv * r + kl * (lp - q) ** 2)).sum()))
        coeffs.append(w * (-keep * tau * adv * r + 2 * kl * (lp - q)))
        ratios.append(r[d.active])
        masked_parts.append(masked[d.active].astype(np.float64))
    return losses, coeffs, {"ratio:mean": _mean(ratios), "mask_fraction:mean": _mean(masked_parts)}


def _log_sigmoid(z: float) -> float:
    return -float(np.logaddexp(0.0, -z))  # stable for large |z|


def _dpo(rows: list[Row], cfg: dict[str, float]) -> LossResult:
    """Pairs (chosen, rejected); each pair's loss is reported on its chosen datum."""
    beta, ls = cfg["beta"], cfg["label_smoothing"]
    losses, coeffs, margins = [], [], []
    for c, r in zip(rows[0::2], rows[1::2]):
        wc, wr = c.weights(), r.weights()
        chosen = (wc * c.lp).sum() - (wc * c.get("ref_logprobs")).sum()
        rejected = (wr * r.lp).sum() - (wr * r.get("ref_logprobs")).sum()
        m = float(beta * (chosen - rejected))
        losses += [-(1 - ls) * _log_sigmoid(m) - ls * _log_sigmoid(-m), 0.0]
        dm = 0.5 * (1 + math.tanh(m / 2)) - (1 - ls)  # dloss/dm = sigmoid(m) - (1 - ls)
        coeffs += [dm * beta * wc, -dm * beta * wr]
        margins.append(m)
    return losses, coeffs, {"accuracy:mean": float(np.mean(np.asarray(margins) > 0)),
                            "margin:mean": float(np.mean(margins))}


def _gspo(rows: list[Row], cfg: dict[str, float]) -> LossResult:
    """One ratio per datum: ``s = exp(mean of lp - q over the masked positions)``, clipped as in ppo.

    ``L = sum_t -w_t min(s A_t, clip(s) A_t)``; ``dL/ds = sum_t -w_t A_t [unclipped_t]`` and
    ``ds/dlp_t = s M_t / n``, so every masked position gets ``dL/ds * s / n``.
    """
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    losses, coeffs, ratios, clipped = [], [], [], []
    for d in rows:
        w, adv = d.weights(), d.get("advantages")
        q = np.where(d.active, d.get("logprobs"), d.lp)
        mask = d.get("sequence_ratio_mask") if "sequence_ratio_mask" in d.inputs else d.active.astype(np.float64)
        n = float(mask.sum())
        s = math.exp(float((mask * (d.lp - q)).sum()) / n) if n else 1.0
        sc = min(max(s, lo), hi)
        unclipped = s * adv <= sc * adv
        losses.append(float((w * -np.minimum(s * adv, sc * adv)).sum()))
        dl_ds = float((w * np.where(unclipped, -adv, 0.0)).sum())
        coeffs.append(dl_ds * s * mask / n if n else np.zeros_like(d.lp))
        if n:
            ratios.append(np.array([s]))
            clipped.append(np.array([float(s < lo or s > hi)]))
    return losses, coeffs, {"ratio:mean": _mean(ratios), "clip_fraction:mean": _mean(clipped)}


def _stable_reinforce(rows: list[Row], cfg: dict[str, float]) -> LossResult:
    """``sum_t w_t S_t (-sg(r_t) A_t lp_t + kl_coeff (r_t - 1 - log r_t))`` over sampled positions
    ``S_t``; its dL/dlp is ``w_t S_t (-r_t A_t + kl_coeff (r_t - 1))`` (r is detached in the first term)."""
    kl = cfg["kl_coeff"]
    losses, coeffs, ratios, kls = [], [], [], []
    for d in rows:
        lp, adv = d.lp, d.get("advantages")
        sampled = d.active & (np.asarray(sampled_mask(d.datum)) > 0)
        w = np.where(sampled, d.weights(), 0.0)
        q = np.where(sampled, d.get("logprobs"), lp)  # elsewhere: ratio 1, no term
        r = np.exp(lp - q)
        k3 = r - 1 - (lp - q)
        losses.append(float((w * (-r * adv * lp + kl * k3)).sum()))
        coeffs.append(w * (-r * adv + kl * (r - 1)))
        ratios.append(r[sampled])
        kls.append(k3[sampled])
    return losses, coeffs, {"ratio:mean": _mean(ratios), "sampler_kl:mean": _mean(kls)}


LOSS_GRADIENTS: dict[str, Callable[[list[Row], dict[str, float]], LossResult]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _ratio_loss("importance_sampling"),
    "ppo": _ratio_loss("ppo"),
    "cispo": _ratio_loss("cispo"),
    "dro": _ratio_loss("dro"),
    "dpo": _dpo,
    "dppo": _dppo,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
}
