"""The nine losses of ``loops_core.losses``, as pure functions on tensors.

Each function takes the trainer's logprobs of one packed micro-batch plus the datums' inputs,
flattened the same way (:class:`LossInputs`), and returns the summed loss (a differentiable scalar)
and its metrics as (numerator, denominator) pairs, so that micro-batches combine exactly
(:func:`combine_stats`). The formulas are the table in ``loops_core.losses``; ``w_t`` (the optional
``weights`` input, default 1) multiplies every per-token term, so a zero weight removes a token from
the loss while its logprob is still reported.

Metric conventions (not fixed by the table, chosen here):

* ``num_tokens:sum`` counts active target entries: positions, or ``(t, k)`` entries for
  ``[T, K]`` targets (as ``loops_core.losses`` says).
* ``ratio:mean`` is the mean of ``r_t = exp(lp_t - q_t)`` over active positions.
* ``clip_fraction:mean`` is the fraction of active positions whose ratio lies outside
  ``[clip_low, clip_high]``.
* ``margin:mean`` is the mean over pairs of the beta-scaled margin ``m``; ``accuracy:mean`` the
  fraction of pairs with ``m > 0``.
* dppo's ``mask_fraction:mean`` is the fraction of active positions its trust region drops
  (``M_t = 1``).
* gspo's ``ratio:mean`` / ``clip_fraction:mean`` count datums (one sequence ratio each, over the
  datums whose mask covers at least one position); stable_reinforce's ``sampler_kl:mean`` is the
  mean of ``r - 1 - log r`` over active positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = dict[str, tuple[Tensor, Tensor]]  # metric name -> (numerator, denominator)


@dataclass
class LossInputs:
    """One packed micro-batch: ``N`` positions, ``K`` targets per position (K = 1 except for
    cross_entropy with ``[T, K]`` targets). Every tensor is finite: the packer puts 0 where a
    target is inactive, so NaN in an unused input cannot leak into a gradient."""

    logprobs: Tensor  # [N, K] float32, the trainer's lp_t (0 where inactive); carries the graph
    active: Tensor  # [N, K] bool, target id >= 0
    weights: Tensor  # [N, K] float32, w_t (1 if not given; 0 where inactive)
    datum: Tensor  # [N] int64, index of the datum within the micro-batch
    num_datums: int
    sampler_logprobs: Tensor | None = None  # [N] q_t
    advantages: Tensor | None = None  # [N] A_t
    ref_logprobs: Tensor | None = None  # [N] (dpo)
    clip_low: Tensor | None = None  # [N] per-token thresholds (config value where not given)
    clip_high: Tensor | None = None
    sequence_ratio_mask: Tensor | None = None  # [N] (gspo) positions the sequence ratio covers
    sampled_mask: Tensor | None = None  # [N] (stable_reinforce) 1 where the provenance spans say "sampled"


@dataclass
class LossOutput:
    loss: Tensor  # scalar; backward() of it adds this micro-batch's gradient
    stats: Stats


def _count(x: Tensor) -> Tensor:
    return x.sum(dtype=torch.float32)


def _one(x: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.float32, device=x.device)


def _base_stats(b: LossInputs, loss: Tensor) -> Stats:
    return {"loss:sum": (loss.detach(), _one(loss)),
            "num_tokens:sum": (_count(b.active), _one(loss))}


def _rl_terms(b: LossInputs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """lp, q, A, w, active as [N] vectors (RL losses have one target per position)."""
    assert b.sampler_logprobs is not None and b.advantages is not None
    return (b.logprobs[:, 0], b.sampler_logprobs, b.advantages, b.weights[:, 0], b.active[:, 0])


def _ratio(lp: Tensor, q: Tensor, active: Tensor) -> Tensor:
    # Inactive positions have lp = q = 0, so r = 1 there: finite, and weighted out below.
    return torch.exp(torch.where(active, lp - q, torch.zeros_like(lp)))


def _ratio_stats(r: Tensor, active: Tensor) -> Stats:
    return {"ratio:mean": ((r.detach() * active).sum(), _count(active))}


def cross_entropy(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t -w_t * lp_t (signed weights allowed; [T, K] targets score K tokens per position)."""
    loss = -(b.weights * b.logprobs).sum()
    return LossOutput(loss, _base_stats(b, loss))


def importance_sampling(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t -r_t * A_t."""
    lp, q, adv, w, active = _rl_terms(b)
    r = _ratio(lp, q, active)
    loss = -(w * r * adv).sum()
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, active)})


def _clip_bounds(b: LossInputs, config: dict[str, float]) -> tuple[Tensor | float, Tensor | float]:
    lo = b.clip_low if b.clip_low is not None else config["clip_low_threshold"]
    hi = b.clip_high if b.clip_high is not None else config["clip_high_threshold"]
    return lo, hi


def _clip(r: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    lo_t = torch.as_tensor(lo, dtype=r.dtype, device=r.device)
    hi_t = torch.as_tensor(hi, dtype=r.dtype, device=r.device)
    return torch.minimum(torch.maximum(r, lo_t), hi_t)


def _clip_stats(r: Tensor, lo, hi, active: Tensor) -> Stats:
    r = r.detach()
    outside = ((r < lo) | (r > hi)) & active
    return {"clip_fraction:mean": (_count(outside), _count(active))}


def ppo(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t -min(r_t A_t, clip(r_t, lo, hi) A_t)."""
    lp, q, adv, w, active = _rl_terms(b)
    lo, hi = _clip_bounds(b, config)
    r = _ratio(lp, q, active)
    objective = torch.minimum(r * adv, _clip(r, lo, hi) * adv)
    loss = -(w * objective).sum()
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, active),
                             **_clip_stats(r, lo, hi, active)})


def cispo(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t -sg(clip(r_t, lo, hi)) * A_t * lp_t."""
    lp, q, adv, w, active = _rl_terms(b)
    lo, hi = _clip_bounds(b, config)
    r = _ratio(lp, q, active)
    loss = -(w * _clip(r, lo, hi).detach() * adv * lp).sum()
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, active),
                             **_clip_stats(r, lo, hi, active)})


def dro(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t -(A_t * lp_t - beta/2 * (lp_t - q_t)^2)."""
    lp, q, adv, w, active = _rl_terms(b)
    beta = config["beta"]
    loss = -(w * (adv * lp - beta / 2 * (lp - q) ** 2)).sum()
    r = _ratio(lp, q, active)
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, active)})


def dpo(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """Pairs (chosen = even datum, rejected = odd): m = beta * ((s_c - s_c,ref) - (s_r - s_r,ref))
    with s = sum_t w_t lp_t; loss = sum_pairs -(1 - ls) log sig(m) - ls log sig(-m)."""
    assert b.ref_logprobs is not None and b.num_datums % 2 == 0
    beta, ls = config["beta"], config["label_smoothing"]
    w = b.weights[:, 0]
    per_token = w * (b.logprobs[:, 0] - b.ref_logprobs)  # w_t (lp_t - ref_t); 0 where inactive
    delta = torch.zeros(b.num_datums, dtype=per_token.dtype, device=per_token.device)
    delta = delta.index_add(0, b.datum, per_token)  # s - s_ref per datum
    m = beta * (delta[0::2] - delta[1::2])
    loss = -((1 - ls) * F.logsigmoid(m) + ls * F.logsigmoid(-m)).sum()
    pairs = torch.full((), m.numel(), dtype=torch.float32, device=m.device)
    return LossOutput(loss, {**_base_stats(b, loss),
                             "accuracy:mean": (_count(m.detach() > 0), pairs),
                             "margin:mean": (m.detach().sum(), pairs)})


def dppo(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t w_t (-(1 - M_t) adv_tau A_t r_t + kl_tau (lp_t - q_t)^2), where the mask M_t drops a
    token whose probability moved past the bound in its advantage's direction:
    d_t = exp(lp_t) - exp(q_t) > dppo_mask_high when A_t > 0, d_t < -dppo_mask_low otherwise.
    M_t is a constant; the gradient flows through r_t and the squared log-ratio."""
    lp, q, adv, w, active = _rl_terms(b)
    log_r = torch.where(active, lp - q, torch.zeros_like(lp))
    r = torch.exp(log_r)
    with torch.no_grad():
        moved = torch.exp(lp) - torch.exp(q)
        masked = torch.where(adv > 0, moved > config["dppo_mask_high"], moved < -config["dppo_mask_low"]) & active
    keep = (~masked & active).to(lp.dtype)
    loss = (w * (-keep * config["adv_tau"] * adv * r + config["kl_tau"] * log_r ** 2)).sum()
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, active),
                             "mask_fraction:mean": (_count(masked), _count(active))})


def gspo(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """Per datum s = exp(sum_t M_t (lp_t - q_t) / n), n = sum_t M_t (s = 1 when n = 0);
    sum_t -w_t min(s A_t, clip(s, lo, hi) A_t). The gradient reaches every masked lp_t through s."""
    lp, q, adv, w, active = _rl_terms(b)
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    mask = b.sequence_ratio_mask if b.sequence_ratio_mask is not None else active.to(lp.dtype)
    mask = torch.where(active, mask, torch.zeros_like(mask))
    zeros = torch.zeros(b.num_datums, dtype=lp.dtype, device=lp.device)
    n = zeros.index_add(0, b.datum, mask)
    total = zeros.index_add(0, b.datum, mask * (lp - q))
    has = n > 0
    s = torch.exp(torch.where(has, total / torch.where(has, n, torch.ones_like(n)), torch.zeros_like(n)))
    s_t = s[b.datum]  # each position sees its datum's ratio
    objective = torch.minimum(s_t * adv, _clip(s_t, lo, hi) * adv)
    loss = -(w * objective).sum()
    sd = s.detach()
    return LossOutput(loss, {**_base_stats(b, loss),
                             "ratio:mean": ((sd * has).sum(), _count(has)),
                             "clip_fraction:mean": (_count(((sd < lo) | (sd > hi)) & has), _count(has))})


def stable_reinforce(b: LossInputs, config: dict[str, float]) -> LossOutput:
    """sum_t w_t S_t (-sg(r_t) A_t lp_t + kl_coeff (r_t - 1 - log r_t)), S_t = sampled position."""
    lp, q, adv, w, active = _rl_terms(b)
    sampled = active & (b.sampled_mask > 0) if b.sampled_mask is not None else active
    r = _ratio(lp, q, sampled)
    log_r = torch.where(sampled, lp - q, torch.zeros_like(lp))
    k3 = r - 1 - log_r
    w = torch.where(sampled, w, torch.zeros_like(w))
    loss = (w * (-r.detach() * adv * lp + config["kl_coeff"] * k3)).sum()
    return LossOutput(loss, {**_base_stats(b, loss), **_ratio_stats(r, sampled),
                             "sampler_kl:mean": ((k3.detach() * sampled).sum(), _count(sampled))})


LOSS_FUNCTIONS = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "dpo": dpo,
    "dppo": dppo,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}


def combine_stats(parts: list[Stats], config: dict[str, float]) -> dict[str, float]:
    """Metrics over micro-batches: ``:sum`` metrics add up, ``:mean`` metrics are
    sum(numerators) / sum(denominators) (0.0 when nothing was counted: metrics travel as JSON)."""
    out: dict[str, float] = {}
    for name in parts[0]:
        num = sum(float(p[name][0]) for p in parts)
        den = sum(float(p[name][1]) for p in parts)
        out[name] = num if name.endswith(":sum") else (num / den if den else 0.0)
    if config.get("skip_token_normalization"):
        out["skip_token_normalization"] = 1.0
    return out
