"""Chunked target logprobs: ``log_softmax(lm_head(hidden))`` at the targets, never the full logits.

Separate from ``trainer.py`` because it is a self-contained piece of memory plumbing (and tested
on its own against full logits).

The ``[tokens x vocab]`` fp32 logits are never materialised: the transformer returns its final
hidden states, then ``lm_head`` + ``log_softmax`` + gather run on chunks of
``logprob_chunk_tokens`` rows under ``torch.utils.checkpoint``, so backward recomputes each
chunk's logits instead of keeping them all. A call whose active rows fit in one chunk skips the
checkpoint: its one chunk of logits would be alive at the start of backward either way (kept, or
recomputed), so recomputing would cost an ``lm_head`` matmul and save nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import kernels


def _chunk_logprobs(hidden: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None,
                    top_k: int = 0):
    logits = lm_head(hidden)  # [n, V]: the only full-vocabulary tensor, one chunk's worth
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits.gather(-1, targets.clamp(min=0)) - lse
    if not top_k:
        return picked
    with torch.no_grad():  # reported, never differentiated
        vals, ids = (logits.detach() - lse.detach()).topk(top_k, dim=-1)
    return picked, vals, ids


def logprobs_and_topk(hidden: Tensor, lm_head: nn.Module, targets: Tensor, *, chunk_tokens: int,
                      softcap: float | None = None, rows: Tensor | None = None, num_rows: int | None = None,
                      top_k: int = 0, fused: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``log_softmax(lm_head(hidden))`` gathered at ``targets`` ([N, K]; negative = inactive, gets
    0), and with ``top_k`` > 0 the k likeliest tokens at every row (logprobs [N, k], ids [N, k]).

    Only rows with an active target are computed (a masked prompt costs no ``lm_head``) unless
    ``top_k`` asks for every row; ``rows``/``num_rows`` name the active rows when the caller
    found them on the host (asking the device would be a sync). When there are several chunks,
    each runs under checkpoint so that backward recomputes its logits. ``fused``: liger's fused
    linear cross-entropy (``kernels.py``) where no gradient is needed and K = 1.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    n = targets.shape[0]
    if top_k:
        rows, num_rows = torch.arange(n, device=hidden.device), n
    elif rows is None:
        rows = (targets >= 0).any(-1).nonzero().squeeze(-1)
        num_rows = int(rows.numel())
    out = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
    if num_rows == 0:
        return out + 0.0 * hidden.sum(), None  # keep the graph connected; the gradient is zero
    h, t = (hidden, targets) if num_rows == n and top_k else (hidden[rows], targets[rows])
    if fused and not top_k and targets.shape[1] == 1 and not (torch.is_grad_enabled() and h.requires_grad):
        lp = kernels.fused_target_logprobs(h, lm_head, t[:, 0].clamp(min=0), softcap)[:, None]
        return out.index_put((rows,), torch.where(t >= 0, lp, 0.0).to(dtype)), None
    # Checkpoint only when there are several chunks (see the module docstring).
    checkpointed = torch.is_grad_enabled() and h.requires_grad and num_rows > chunk_tokens
    parts = []
    for s in range(0, num_rows, chunk_tokens):
        args = (h[s:s + chunk_tokens], t[s:s + chunk_tokens], lm_head, softcap, top_k)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if checkpointed
                     else _chunk_logprobs(*args))
    if top_k:
        lp = torch.cat([p[0] for p in parts])
        topk = (torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
        return torch.where(t >= 0, lp, 0.0).to(dtype), topk
    lp = torch.cat(parts)
    return out.index_put((rows,), torch.where(t >= 0, lp, 0.0)), None


def fused_ce_available() -> bool:
    return kernels.liger_available()


def target_logprobs(hidden: Tensor, lm_head: nn.Module, targets: Tensor, *, chunk_tokens: int,
                    softcap: float | None = None, rows: Tensor | None = None,
                    num_rows: int | None = None) -> Tensor:
    """The target logprobs of :func:`logprobs_and_topk` alone."""
    return logprobs_and_topk(hidden, lm_head, targets, chunk_tokens=chunk_tokens, softcap=softcap,
                             rows=rows, num_rows=num_rows)[0]
