"""Loss functions: names, inputs, config defaults, and request validation. No math lives here.

Every engine implements these with the same meaning. Notation, per datum and per position ``t``
of its input: ``lp_t`` is the trainer's log-probability of ``target_tokens[t]`` given positions
``<= t``; ``q_t`` is the sampler's logprob (``logprobs`` input); ``A_t`` the advantage;
``r_t = exp(lp_t - q_t)`` the importance ratio; ``sg`` stops the gradient. A position is *active*
when its target id is >= 0; inactive positions (e.g. -100) contribute nothing and their output
logprob is NaN. Losses are **sums** over active positions and datums (no normalisation, as in
Tinker): scale with ``weights`` or ``advantages`` if you want a mean.

==================== ====================================================== ====================
loss_fn              loss                                                   config (defaults)
==================== ====================================================== ====================
cross_entropy        sum_t -w_t * lp_t   (``weights`` default 1; signed       --
                     weights are allowed; [T, K] targets+weights score K
                     tokens per position)
importance_sampling  sum_t -r_t * A_t                                       --
ppo                  sum_t -min(r_t A_t, clip(r_t, lo, hi) A_t)             clip_low_threshold 0.8,
                                                                            clip_high_threshold 1.2
cispo                sum_t -sg(clip(r_t, lo, hi)) * A_t * lp_t              clip_low_threshold 0.8,
                                                                            clip_high_threshold 1.2
dro                  sum_t -(A_t * lp_t - beta/2 * (lp_t - q_t)^2)          beta 0.05
dpo                  datums are pairs (chosen at even, rejected at odd      beta 0.1,
                     index). s = sum_t w_t lp_t, s_ref = sum_t w_t ref_t;   label_smoothing 0.0
                     m = beta*((s_c - s_c,ref) - (s_r - s_r,ref));
                     loss = sum_pairs -(1-ls) log sig(m) - ls log sig(-m)
dppo                 d_t = exp(lp_t) - exp(q_t); M_t = 1 where the token    dppo_mask_high 0.2,
                     left the trust region in its advantage's direction:    dppo_mask_low 0.2,
                     d_t > mask_high if A_t > 0, else d_t < -mask_low;      adv_tau 1.0,
                     sum_t -(1 - M_t) adv_tau A_t r_t                       kl_tau 1e-3
                           + kl_tau (lp_t - q_t)^2
gspo                 per datum, M_t = sequence_ratio_mask_t (default 1)     clip_low_threshold
                     on active positions, n = sum_t M_t,                    0.9997,
                     s = exp(sum_t M_t (lp_t - q_t) / n) (geometric mean    clip_high_threshold
                     of the token ratios; s = 1 when n = 0);                1.0004
                     loss = sum_t -w_t min(s A_t, clip(s, lo, hi) A_t)
stable_reinforce     sum_t w_t S_t (-sg(r_t) A_t lp_t                       kl_coeff 0.01
                                    + kl_coeff (r_t - 1 - log r_t));
                     S_t = 1 where loss_fn_input_spans name a sampled run
                     (SampledProvenanceSpan), 0 in prompt runs; every
                     datum needs provenance spans (with_provenance)
==================== ====================================================== ====================

For importance_sampling, ppo, cispo, dro, dppo, gspo and stable_reinforce an optional ``weights`` input
multiplies each position's term (default 1). ``dro`` follows the quadratic-penalty form of Tinker's
docs; the exact published definition is not available offline, so treat it as this project's
definition. Per-token ``clip_low_threshold`` /
``clip_high_threshold`` inputs, when given, override the config for ppo and cispo.

``cispo``'s defaults are the published baseten-loops client's documented ones (0.8 / 1.2, as for
ppo). Tinker documents 0.0 / 4.0 for its cispo; a Tinker script that relies on those passes them
in ``loss_fn_config``.

``dppo`` is Divergence PPO (the "Binary-TV" trust region of "Rethinking the Trust Region in LLM
Reinforcement Learning", arXiv:2602.04879). The published client documents only its config names
and defaults (``dppo_mask_high=0.2, dppo_mask_low=0.2, adv_tau=1.0, kl_tau=1e-3``); the formula
above is the one those four names have in prime-rl's default RL loss, which is assumed to be what
Baseten's trainer computes: instead of clipping the ratio, a token whose *probability* moved more
than the mask bound (up for a positive advantage, down for a negative one) is dropped from the
policy-gradient term, whose gradient is ``-adv_tau A_t r_t`` (through ``r_t``); every active token
also pays ``kl_tau (lp_t - q_t)^2``. ``M_t`` is a constant (no gradient). With ``A_t = 0`` the
"down" test decides ``M_t``, which only affects the metric.

``gspo`` is Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071): PPO's
clipped objective with one importance ratio per sequence, the length-normalised (geometric mean)
token ratio over the positions ``sequence_ratio_mask`` marks (pass it: prompt positions, whose
``logprobs`` are 0, must not enter the ratio). The defaults are the paper's clip range (3e-4 below,
4e-4 above 1). Each position's term uses its own ``A_t`` (the paper's sequence advantage, when
``A_t`` is constant over the completion) and terms are summed like every loss here, instead of
the paper's mean over the group; the gradient flows through ``s`` to every masked position.

``stable_reinforce`` is this project's reading of Tinker's alpha loss, whose formula is not
published: REINFORCE with the detached importance weight ``r_t`` (its gradient equals
importance_sampling's, ``-r_t A_t``), plus ``kl_coeff`` times the k3 estimate
``r - 1 - log r`` of KL(sampler || trainer) (gradient ``kl_coeff (r_t - 1)``), both only on the
positions the provenance spans mark as sampled: prompt positions, whose ``logprobs`` input is 0 by
Tinker's convention, were never sampled and take no KL term. Like Tinker it requires provenance
spans on every datum; loops servers check that they tile the datum but do not look the sequences
up (there is no server-side sampling record): the ``logprobs`` input is the sampler's logprob.

Outputs (every loss): per datum ``{"logprobs": TensorData float32 shaped like target_tokens}``.
Metrics: ``loss:sum``, ``num_tokens:sum`` (active target entries: positions, or (t, k) entries
for [T, K] targets); ppo and cispo add ``clip_fraction:mean`` (share of active tokens with
r < lo or r > hi); importance_sampling/ppo/cispo/dro add ``ratio:mean`` (mean r over active
tokens); dpo adds ``accuracy:mean`` (share of pairs with m > 0) and ``margin:mean`` (mean m);
dppo adds ``ratio:mean`` and ``mask_fraction:mean`` (share of active tokens with M_t = 1);
gspo adds ``ratio:mean`` (mean s over datums with n > 0) and ``clip_fraction:mean`` (share of those
datums with s < lo or s > hi); stable_reinforce adds ``ratio:mean`` and ``sampler_kl:mean`` (means
of r and of r - 1 - log r over active sampled positions).
A mean over nothing is 0.0. If the config sets ``skip_token_normalization`` the metric
``skip_token_normalization`` = 1.0 is echoed (the published client's custom-loss path checks it;
our losses are never normalised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidRequestError
from .types import Datum, TensorData


@dataclass(frozen=True)
class LossSpec:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)
    paired: bool = False  # dpo: datums come in (chosen, rejected) pairs
    needs_provenance: bool = False  # stable_reinforce: every datum carries provenance spans


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in [
        LossSpec("cross_entropy", ("target_tokens",), ("weights",)),
        LossSpec("importance_sampling", _RL_INPUTS, ("weights",)),
        LossSpec("ppo", _RL_INPUTS, ("weights", *_CLIP_INPUTS),
                 {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        LossSpec("cispo", _RL_INPUTS, ("weights", *_CLIP_INPUTS),
                 {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        LossSpec("dro", _RL_INPUTS, ("weights",), {"beta": 0.05}),
        LossSpec("dpo", ("target_tokens", "ref_logprobs"), ("weights",),
                 {"beta": 0.1, "label_smoothing": 0.0}, paired=True),
        LossSpec("dppo", _RL_INPUTS, ("weights",),
                 {"dppo_mask_high": 0.2, "dppo_mask_low": 0.2, "adv_tau": 1.0, "kl_tau": 1e-3}),
        LossSpec("gspo", _RL_INPUTS, ("weights", "sequence_ratio_mask"),
                 {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}),
        LossSpec("stable_reinforce", _RL_INPUTS, ("weights",), {"kl_coeff": 0.01}, needs_provenance=True),
    ]
}

# Config keys accepted by every loss (the published client's custom-loss path sends this one).
COMMON_CONFIG = {"skip_token_normalization": 0.0}


def resolve_config(loss_fn: str, config: Mapping[str, Any] | None) -> dict[str, float]:
    """The loss config with defaults filled in; unknown keys are an error."""
    spec = get_spec(loss_fn)
    allowed = {**COMMON_CONFIG, **spec.config}
    out = dict(allowed)
    for k, v in (config or {}).items():
        if k not in allowed:
            raise InvalidRequestError(
                f"loss_fn_config key {k!r} is not used by {loss_fn!r}; "
                f"accepted keys: {sorted(allowed)}", field=f"loss_fn_config.{k}")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"loss_fn_config[{k!r}] must be a number, got {v!r}",
                                      field=f"loss_fn_config.{k}") from None
    return out


def get_spec(loss_fn: str) -> LossSpec:
    if loss_fn not in LOSSES:
        raise InvalidRequestError(
            f"Unknown loss_fn {loss_fn!r}; choose one of {sorted(LOSSES)} "
            "(or use forward_backward_custom for your own loss)", field="loss_fn")
    return LOSSES[loss_fn]


def validate_batch(data: list[Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None,
                   *, vocab_size: int | None = None, max_seq_len: int | None = None) -> dict[str, float]:
    """Check a forward/forward_backward request; return the resolved config.

    Raises InvalidRequestError naming the datum and field. Runs on the client (without
    ``vocab_size``) and again on the server (with it), before anything is executed.
    """
    spec = get_spec(loss_fn)
    config = resolve_config(loss_fn, loss_fn_config)
    if not data:
        raise InvalidRequestError("data is empty: pass at least one Datum", field="data")
    if spec.paired and len(data) % 2:
        raise InvalidRequestError(
            f"{loss_fn} needs datums in (chosen, rejected) pairs; got {len(data)} datums", field="data")
    for i, d in enumerate(data):
        _validate_datum(i, d, spec, vocab_size, max_seq_len)
    return config


def _validate_datum(i: int, d: Datum, spec: LossSpec, vocab_size: int | None,
                    max_seq_len: int | None) -> None:
    where = f"data[{i}]"
    n = d.model_input.length
    if n == 0:
        raise InvalidRequestError(f"{where}.model_input is empty", field=f"{where}.model_input")
    if max_seq_len is not None and n > max_seq_len:
        raise InvalidRequestError(
            f"{where}.model_input has {n} tokens, more than max_seq_len={max_seq_len}",
            field=f"{where}.model_input")
    if vocab_size is not None:
        for chunk in d.model_input.chunks:
            for t in getattr(chunk, "tokens", ()):
                if not 0 <= t < vocab_size:
                    raise InvalidRequestError(
                        f"{where}.model_input holds token id {t}, outside the vocabulary [0, {vocab_size})",
                        field=f"{where}.model_input")
    if spec.needs_provenance and d.model_input_spans is None:
        raise InvalidRequestError(
            f"{where} has no provenance spans, which {spec.name} needs: sample with "
            "record_stability_info=True and attach spans with datum.with_provenance(model_input=[...], "
            "loss_fn_inputs=[...]) naming each sampled sequence_id", field=f"{where}.model_input_spans")
    if d.model_input_spans is not None:
        _check_spans(where, "model_input_spans", d.model_input_spans, n)
    inputs = d.loss_fn_inputs
    for key in spec.required:
        if key not in inputs:
            raise InvalidRequestError(
                f"{where}.loss_fn_inputs is missing {key!r}, which {spec.name} needs "
                f"(required: {list(spec.required)})", field=f"{where}.loss_fn_inputs.{key}")
    for key in inputs:
        if key not in spec.required and key not in spec.optional:
            raise InvalidRequestError(
                f"{where}.loss_fn_inputs has key {key!r}, which {spec.name} does not use "
                f"(accepted: {list(spec.required + spec.optional)})", field=f"{where}.loss_fn_inputs.{key}")
    target = inputs["target_tokens"]
    _check_td(where, "target_tokens", target, n, ints=True)
    if d.loss_fn_input_spans is not None and len(target.shape or []) == 1:
        _check_spans(where, "loss_fn_input_spans", d.loss_fn_input_spans, target.shape[0])
    if len(target.shape or []) not in (1, 2) or (len(target.shape) == 2 and spec.name != "cross_entropy"):
        raise InvalidRequestError(
            f"{where}.loss_fn_inputs['target_tokens'] has shape {target.shape}; expected [{n}]"
            + (f" or [{n}, K]" if spec.name == "cross_entropy" else ""),
            field=f"{where}.loss_fn_inputs.target_tokens")
    if vocab_size is not None:
        bad = [t for t in target.data if t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{where}.loss_fn_inputs['target_tokens'] holds token id {bad[0]}, outside the "
                f"vocabulary [0, {vocab_size}) (use a negative id such as -100 to mask a position)",
                field=f"{where}.loss_fn_inputs.target_tokens")
    for key, td in inputs.items():
        if key == "target_tokens":
            continue
        _check_td(where, key, td, n, ints=False)
        if key in ("weights",) and td.shape != target.shape:
            raise InvalidRequestError(
                f"{where}.loss_fn_inputs[{key!r}] has shape {td.shape} but target_tokens has {target.shape}",
                field=f"{where}.loss_fn_inputs.{key}")
        if key != "weights" and td.shape != [n]:
            raise InvalidRequestError(
                f"{where}.loss_fn_inputs[{key!r}] has shape {td.shape}; expected [{n}] (one value per "
                "input position)", field=f"{where}.loss_fn_inputs.{key}")


def sampled_mask(d: Datum) -> list[float]:
    """Per input position: 1.0 where ``loss_fn_input_spans`` name a sampled run, 0.0 in prompt runs
    (all 1.0 without provenance)."""
    if d.loss_fn_input_spans is None:
        return [1.0] * d.model_input.length
    return [1.0 if s.type == "sampled" else 0.0 for s in d.loss_fn_input_spans for _ in range(s.length)]


def _check_spans(where: str, name: str, spans: list[Any], n: int) -> None:
    total = sum(s.length for s in spans)
    if total != n:
        raise InvalidRequestError(f"{where}.{name} cover {total} positions but the datum has {n}; the spans "
                                  "must tile it exactly", field=f"{where}.{name}")


def _check_td(where: str, key: str, td: TensorData, n: int, *, ints: bool) -> None:
    fld = f"{where}.loss_fn_inputs.{key}"
    if ints and td.dtype not in ("int64", "int32"):
        raise InvalidRequestError(
            f"{where}.loss_fn_inputs[{key!r}] has dtype {td.dtype!r}; token ids must be int64", field=fld)
    if not ints and td.dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise InvalidRequestError(
            f"{where}.loss_fn_inputs[{key!r}] has dtype {td.dtype!r}; it must be float32", field=fld)
    if not td.shape or td.shape[0] != n:
        raise InvalidRequestError(
            f"{where}.loss_fn_inputs[{key!r}] has shape {td.shape} but model_input has {n} positions; "
            f"per-position inputs need length {n} (target_tokens[i] is the label for position i)",
            field=fld)
