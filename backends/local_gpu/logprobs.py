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


def _chunk_logprobs(hidden: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None) -> Tensor:
    logits = lm_head(hidden)  # [n, V]: the only full-vocabulary tensor, one chunk's worth
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, targets.clamp(min=0))
    return picked - torch.logsumexp(logits, dim=-1, keepdim=True)


def target_logprobs(hidden: Tensor, lm_head: nn.Module, targets: Tensor, *, chunk_tokens: int,
                    softcap: float | None = None) -> Tensor:
    """``log_softmax(lm_head(hidden))`` gathered at ``targets`` ([N, K]; negative = inactive, gets 0).

    Only rows with an active target are computed (a masked prompt costs no ``lm_head``); when
    there are several chunks, each runs under checkpoint so that backward recomputes its logits.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
    rows = (targets >= 0).any(-1).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return out + 0.0 * hidden.sum()  # keep the graph connected; the gradient is zero
    h, t = hidden[rows], targets[rows]
    # Checkpoint only when there are several chunks (see the module docstring).
    checkpointed = torch.is_grad_enabled() and h.requires_grad and rows.numel() > chunk_tokens
    parts = []
    for s in range(0, rows.numel(), chunk_tokens):
        args = (h[s:s + chunk_tokens], t[s:s + chunk_tokens], lm_head, softcap)
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if checkpointed
                     else _chunk_logprobs(*args))
    lp = torch.cat(parts)
    return out.index_put((rows,), torch.where(t >= 0, lp, 0.0))
