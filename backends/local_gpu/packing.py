"""Packing: the datums of a call as one row of tokens, and the attention that keeps them apart.

Separate from ``trainer.py`` so that the engine reads top to bottom; this is the plumbing between
a list of datums and one transformer forward, and the inverse split of its logprobs.

All datums of a call go into one ``[1, total_tokens]`` row, no padding, with ``position_ids``
restarting at 0 for each datum. Attention must not cross datum boundaries:

* on CUDA in bf16/fp16 attention is varlen flash attention, given ``cu_seq_lens`` (the datum
  boundaries) and so costing only ``sum(len_i^2)``: ``flash_attention_2`` when ``flash_attn``
  imports, else ``loops_varlen``, our transformers attention function over PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9);
* elsewhere (CPU, fp32) ``sdpa``: transformers >= 4.53 (``masking_utils.find_packed_sequence_indices``)
  detects the restarting ``position_ids`` when ``attention_mask`` is None and builds a
  block-diagonal causal mask. That mask is ``[N, N]``, and the attention computes every block, so
  micro-batches are kept moderate (``micro_batch_tokens``);
* on older transformers (or with ``packing="mask"``) we pass that mask ourselves, as a 4-D additive
  float mask, which eager and sdpa attention accept as is.

A call whose tokens exceed ``micro_batch_tokens`` is split into several rows (whole datums, dpo
pairs kept together) that run forward+backward one after the other. The losses are sums over
datums, so the result is the same, only the peak memory is lower.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loops_core.losses import sampled_mask
from loops_core.types import Datum, TensorData

# --------------------------------------------------------------------------------------------
# Which attention keeps packed datums apart
# --------------------------------------------------------------------------------------------


def _default_attention(device: torch.device, dtype: torch.dtype) -> str:
    """Varlen flash attention on CUDA in half precision (flash_attn's, else torch's), else sdpa."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        if _varlen_kernel() is not None:
            return VARLEN
    return "sdpa"


# ---- loops_varlen: transformers attention over torch.nn.attention.varlen.varlen_attn ---------

VARLEN = "loops_varlen"
VARLEN_IMPLEMENTATIONS = {"flash_attention_2", "flash_attention_3", VARLEN}  # take cu_seq_lens


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, sliding_window: int | None = None, *,
                             kernel=None, **kwargs):
    """A transformers attention function: one packed row, datums delimited by ``cu_seq_lens_q``.

    ``query`` is ``[1, H, N, D]``, ``key``/``value`` ``[1, H_kv, N, D]``; returns ``[1, N, H, D]``.
    Without ``cu_seq_lens_q`` (an ordinary call) the row is one sequence. ``kernel`` is
    ``varlen_attn`` unless given (the trainer passes its own lookup, which tests replace).
    """
    kernel = kernel or _varlen_kernel()
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention takes one packed row, got a batch of {query.shape[0]}")
    n = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:
        cu = torch.tensor([0, n], dtype=torch.int32, device=query.device)
        max_len = n
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [N, H, D]
    params = _parameters(kernel)
    kw = {"scale": scaling}
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "window_size" in params:  # (left, right); HF's window W lets a query see W keys
        kw["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    else:
        if sliding_window:
            raise NotImplementedError(f"{VARLEN}: this torch's varlen_attn has no sliding window")
        kw["is_causal"] = True
    out = kernel(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset[str]:
    # varlen_attn's keywords changed between torch releases (is_causal -> window_size, enable_gqa).
    return frozenset(inspect.signature(fn).parameters)


def _transformers_detects_packing() -> bool:
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


# --------------------------------------------------------------------------------------------
# Packing: datums -> one row of tokens plus flat loss inputs
# --------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    input_ids: Tensor  # [1, N]
    position_ids: Tensor  # [1, N], restarting at 0 per datum
    targets: Tensor  # [N, K] int64, -1 pads K and marks inactive targets
    inputs: dict[str, Tensor]  # flat loss inputs for LossInputs (weights [N, K], others [N])
    datum: Tensor  # [N] datum index within the batch
    cu_seq_lens: Tensor  # [B + 1] int32 datum boundaries, for varlen attention
    lengths: list[int]
    target_shapes: list[list[int]]  # per datum, to shape the returned logprobs
    # Rows (positions) with at least one active target, found on the host while packing, so that
    # the forward never asks the device which rows are active (a sync); and how many.
    active_rows: Tensor
    num_active: int


def pack(data: list[Datum], loss_fn: str, config: dict[str, float], device: torch.device) -> PackedBatch:
    """Concatenate ``data`` into one row; every float input is made finite (0) where inactive."""
    tokens, positions, datum_ids, lengths, shapes = [], [], [], [], []
    targets, weights = [], []
    flat: dict[str, list[Tensor]] = {k: [] for k in ("logprobs", "advantages", "ref_logprobs",
                                                     "clip_low_threshold", "clip_high_threshold",
                                                     "sequence_ratio_mask", "sampled_mask")}
    for i, d in enumerate(data):
        ids = d.model_input.to_ints()
        n = len(ids)
        tokens += ids
        positions += range(n)
        datum_ids += [i] * n
        lengths.append(n)
        inputs = d.loss_fn_inputs
        tgt = inputs["target_tokens"].to_torch().long()
        shapes.append(list(tgt.shape))
        tgt = tgt.reshape(n, -1)
        w = inputs["weights"].to_torch().float().reshape(n, -1) if "weights" in inputs else \
            torch.ones(tgt.shape, dtype=torch.float32)
        targets.append(tgt)
        weights.append(w)
        for key in flat:
            if key in inputs:
                flat[key].append(inputs[key].to_torch().float().reshape(n))
            elif key.startswith("clip_") and key in config:  # ppo/cispo: config where not per-token
                flat[key].append(torch.full((n,), config[key], dtype=torch.float32))
            elif key == "sequence_ratio_mask" and loss_fn == "gspo":  # gspo's default mask: all positions
                flat[key].append(torch.ones(n, dtype=torch.float32))
            elif key == "sampled_mask" and loss_fn == "stable_reinforce":  # from the provenance spans
                flat[key].append(torch.tensor(sampled_mask(d), dtype=torch.float32))
    k = max(t.shape[1] for t in targets)
    target = torch.cat([nn.functional.pad(t, (0, k - t.shape[1]), value=-1) for t in targets])
    weight = torch.cat([nn.functional.pad(w, (0, k - w.shape[1])) for w in weights])
    active = target >= 0
    row_active = active[:, 0]  # losses other than cross_entropy have K = 1
    out: dict[str, Tensor] = {"weights": torch.where(active, weight, 0.0)}
    for key, parts in flat.items():
        if parts:
            if len(parts) != len(data):
                raise ValueError(f"{loss_fn}: loss_fn_inputs[{key!r}] is given for some datums only")
            out[key] = torch.where(row_active, torch.cat(parts), 0.0)
    rows = active.any(-1).nonzero().squeeze(-1)  # on the host: no device sync

    def to(t: Tensor) -> Tensor:
        # Host-to-device copies only overlap with compute from pinned memory.
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    return PackedBatch(
        input_ids=to(torch.tensor([tokens], dtype=torch.long)),
        position_ids=to(torch.tensor([positions], dtype=torch.long)),
        targets=to(target),
        inputs={key: to(v) for key, v in out.items()},
        datum=to(torch.tensor(datum_ids, dtype=torch.long)),
        cu_seq_lens=to(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)),
        lengths=lengths,
        target_shapes=shapes,
        active_rows=to(rows),
        num_active=int(rows.numel()),
    )


def micro_batches(data: list[Datum], max_tokens: int, *, paired: bool) -> list[slice]:
    """Consecutive slices of ``data`` of at most ``max_tokens`` tokens each (a single larger
    datum gets a slice of its own); dpo pairs are never split."""
    unit = 2 if paired else 1
    slices, start, used = [], 0, 0
    for i in range(0, len(data), unit):
        n = sum(d.model_input.length for d in data[i:i + unit])
        if used and used + n > max_tokens:
            slices.append(slice(start, i))
            start, used = i, 0
        used += n
    slices.append(slice(start, len(data)))
    return slices


def block_causal_mask(position_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """[1, 1, N, N] additive mask: 0 where query i may attend key j (same datum, j <= i)."""
    seg = torch.cumsum((position_ids[0] == 0).long(), 0)
    n = seg.numel()
    idx = torch.arange(n, device=seg.device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros((n, n), dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _per_datum_logprobs(lp: Tensor, batch: PackedBatch, topk: tuple[Tensor, Tensor] | None = None
                        ) -> list[dict[str, TensorData]]:
    """Split host copies of [N, K] logprobs (NaN where the target is inactive) and of the [N, k]
    top-k ids and logprobs back per datum, as float32 (ids int64)."""
    out, start = [], 0
    for n, shape in zip(batch.lengths, batch.target_shapes):
        k = shape[1] if len(shape) == 2 else 1
        piece = lp[start:start + n, :k].reshape(shape).float().contiguous()
        entry = {"logprobs": TensorData.from_torch(piece)}
        if topk is not None:
            ids, vals = topk
            entry["topk_token_ids"] = TensorData.from_torch(ids[start:start + n].long().contiguous())
            entry["topk_logprobs"] = TensorData.from_torch(vals[start:start + n].float().contiguous())
        out.append(entry)
        start += n
    return out


def _to_host(stats: list[dict], results: list, grad_norm: Tensor | None):
    """Everything a reply needs, copied to the host in one transfer (float64 holds float32
    values and token ids exactly): the metrics' (numerator, denominator) pairs, the logprobs and
    top-k of every micro-batch, and the gradient norm; returned in the same structure."""
    parts: list[Tensor] = []
    for s in stats:
        for num, den in s.values():
            parts += [num, den]
    for lp, topk in results:
        parts.append(lp)
        if topk is not None:
            parts += [topk[1], topk[0]]  # ids, logprobs
    if grad_norm is not None:
        parts.append(grad_norm)
    device = parts[0].device
    flat = torch.cat([p.detach().reshape(-1).to(device, torch.float64) for p in parts]).cpu()
    pieces, i = [], 0
    for p in parts:
        pieces.append(flat[i:i + p.numel()].view(p.shape))
        i += p.numel()
    it = iter(pieces)
    host_stats = [{name: (next(it), next(it)) for name in s} for s in stats]
    host_results = []
    for _, topk in results:
        lp = next(it)
        host_results.append((lp, None if topk is None else (next(it).long(), next(it).float())))
    norm = float(next(it)) if grad_norm is not None else None
    return host_stats, host_results, norm
