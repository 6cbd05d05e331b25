"""The HF sampler's per-row math: token draws, stop checks, prompt logprobs.

Separate from ``sampler_hf.py`` (which queues, batches and runs the model) because this is plain
functions of their arguments, with no engine state. torch is imported inside the functions, as
the engine does, so importing the sampler modules imports no torch.

Sampling is per row: temperature (< 1e-5 means greedy), top-k, top-p, and a row-local
``torch.Generator``. Tokens are drawn by the exponential form of Gumbel-max, ``argmax(p / E)``
with ``E ~ Exp(1)`` over the vocabulary from the row's own generator, so a row's draw depends
only on its own probabilities and seed, never on the other rows of the batch. Logprobs are those
of the sampled token under ``softmax(logits / T)`` over the full vocabulary (``T = 1`` when
greedy), in float32.
"""

from __future__ import annotations

from typing import Any

# Prompt logprobs are computed over at most this many float32 logits at once.
_PROMPT_LOGITS_BUDGET = 1 << 25  # 128 MiB of float32


def sample(logits, rows: list[Any]) -> tuple[list[int], list[float], list | None]:
    """One token per row of ``logits`` [B, V] (float32), with its logprob, and for rows whose
    ``topk`` > 0 the ``topk`` best (token, logprob) of the same distribution (else None).

    ``rows[j]`` holds row j's settings (an ``hf_queue.Row``): ``temperature``, ``greedy``,
    ``top_k``, ``top_p``, ``topk``, ``done``, and the ``generator`` it draws from.
    """
    import torch

    B, V = logits.shape
    dev = logits.device
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev)
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tok = logits.argmax(dim=-1)
    # Rows that draw at random (top_k == 1 is the argmax whatever the temperature).
    samp = [j for j, r in enumerate(rows) if not r.greedy and r.top_k != 1 and not r.done]
    if samp:
        probs = logp[samp].exp()
        # top-k / top-p: zero the tokens outside the kept set.
        filt = [i for i, j in enumerate(samp) if 0 < rows[j].top_k < V or rows[j].top_p < 1.0]
        if filt:
            fi = torch.tensor(filt, dtype=torch.long, device=dev)
            ks = [rows[samp[i]].top_k if 0 < rows[samp[i]].top_k < V else V for i in filt]
            ps = [rows[samp[i]].top_p for i in filt]
            probs[fi] = probs[fi] * top_k_top_p_mask(probs[fi], ks, ps)
        chosen = gumbel_max(probs, [rows[j].generator for j in samp])
        tok[torch.tensor(samp, dtype=torch.long, device=dev)] = chosen
    lp = logp.gather(1, tok[:, None])[:, 0]
    kmax = max((getattr(r, "topk", 0) for r in rows), default=0)
    tops = None
    if kmax:
        v, ix = torch.topk(logp, min(kmax, V), dim=-1, sorted=True)
        v, ix = v.tolist(), ix.tolist()
        tops = [list(zip(ix[j][:r.topk], v[j][:r.topk])) if r.topk else None for j, r in enumerate(rows)]
    return tok.tolist(), lp.tolist(), tops


def top_k_top_p_mask(probs, top_k: list[int], top_p: list[float]):
    """Which tokens of each row of ``probs`` [R, V] are kept: among the ``top_k[i]`` (<= V) best,
    those whose better tokens hold less than ``top_p[i]`` of the mass; the best is always kept.
    Rank order is a stable sort, so ties keep the lower token ids."""
    import torch

    V = probs.shape[1]
    dev = probs.device
    ks = torch.tensor(top_k, device=dev)
    ps = torch.tensor(top_p, dtype=torch.float32, device=dev)
    sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.arange(V, device=dev)[None, :] < ks[:, None]
    keep &= (sp.cumsum(-1) - sp) < ps[:, None]  # mass of the better tokens < p
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter_(1, si, keep)


def gumbel_max(probs, generators: list[Any]):
    """The drawn token of each row of ``probs`` [R, V], row ``i`` from ``generators[i]``."""
    import torch

    # Gumbel-max in its exponential form: argmax(p / E), E ~ Exp(1) drawn over the whole
    # vocabulary from the row's own generator, so a row's draw depends on its own
    # probabilities and seed only, and a small perturbation of the logits rarely
    # changes the winner.
    q = torch.empty_like(probs)
    for i, g in enumerate(generators):
        q[i].exponential_(generator=g)
    return (probs / q.clamp_(min=1e-30)).argmax(dim=-1)


def check_stop(r: Any, t: int, eos: set[int], tokenizer) -> None:
    """Mark row ``r`` (an ``hf_queue.Row``) done if its new token ``t`` ends it: a stop token,
    EOS, a stop string (``r.text`` is then the text before it), or ``r.max_new`` tokens."""
    req = r.job.req
    if t in req.stop_token_ids or (req.stop_at_eos and t in eos):
        r.done, r.finish_reason = True, "stop"
        return
    if req.stop:
        longest = max(len(s) for s in req.stop)
        # The new token can only complete a stop string in the last few characters; a byte
        # level token is at least one byte, so 4 tokens per character (plus slack) suffice.
        tail = tokenizer.decode(r.tokens[-(4 * longest + 8):], skip_special_tokens=True)
        if any(s and s in tail for s in req.stop):
            text = tokenizer.decode(list(r.tokens), skip_special_tokens=True)
            hits = [text.find(s) for s in req.stop if s and s in text]
            if hits:
                r.text = text[:min(hits)]
                r.done, r.finish_reason = True, "stop"
                return
    if len(r.tokens) >= r.max_new:
        r.done, r.finish_reason = True, "length"


def prompt_logprobs(hidden, prompt: list[int], k: int, vocab_size: int, logits_fn, adapters,
                    targets_k: list[list[int]] | None = None):
    """Prompt logprobs (temperature 1) of ``prompt`` from its prefill hidden states [P, H].

    Returns ``(logprobs, topk, target_logprobs)``: None for the first token, then each token's
    logprob and, when ``k > 0``, its ``k`` best ``(token, logprob)`` (``topk`` is None when
    ``k == 0``); with ``targets_k`` ([P - 1, K] ids, -1 for none) the logprob of each named id
    as the prediction of prompt token i + 1 (0.0 where the id is -1), else None.
    ``logits_fn`` maps hidden states to float32 logits; ``adapters`` is the context in which it
    uses the row's adapter, entered only when there is something to compute.
    """
    import torch

    P = len(prompt)
    lps: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] | None = [None] if k > 0 else None
    named = None
    if targets_k is not None:
        named_ids = torch.tensor(targets_k, dtype=torch.long, device=hidden.device).reshape(P - 1, -1)
        named = []
    if P > 1:
        targets = torch.tensor(prompt[1:], dtype=torch.long, device=hidden.device)
        chunk = max(1, _PROMPT_LOGITS_BUDGET // max(1, vocab_size))
        with adapters:
            for s in range(0, P - 1, chunk):
                e = min(P - 1, s + chunk)
                logp = torch.log_softmax(logits_fn(hidden[None, s:e, :])[0], dim=-1)
                lps.extend(logp.gather(1, targets[s:e, None])[:, 0].tolist())
                if k > 0:
                    v, ix = torch.topk(logp, k, dim=-1, sorted=True)
                    for vv, ii in zip(v.tolist(), ix.tolist()):
                        tops.append(list(zip(ii, vv)))
                if named is not None:
                    ids = named_ids[s:e]
                    picked = logp.gather(1, ids.clamp(min=0))
                    named.extend(torch.where(ids >= 0, picked, 0.0).tolist())
                del logp
    return lps, tops, named
