"""Merging two left-padded KV caches into one batch: the HF sampler's continuous batching.

Separate from ``sampler_hf.py`` because it is a self-contained operation on transformers'
``DynamicCache`` internals (its ``layers[i].keys`` / ``.values``, [B, H, T, D] tensors), the one
place that depends on their layout. New requests are prefilled as a mini-batch of their own and
then joined to the running batch at a decode-step boundary with ``merge``.

Both caches are left-padded and come with a 2-D attention mask ([B, T], 1 where a row attends) of
the cache's length; rows carry their own explicit position ids, so extra left padding changes
nothing for a row but the (masked) columns it ignores.
"""

from __future__ import annotations


def mergeable(cache) -> bool:
    """Whether ``cache`` is a plain full-attention ``DynamicCache`` that ``merge`` can extend
    (no sliding-window, linear-attention, quantized, offloaded or uninitialized layers)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return False
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return False
    for layer in layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            return False
        if layer.keys is None or layer.keys.dim() != 4 or layer.values is None:
            return False
    return True


def _pad_left(x, length: int, dim: int):
    """``x`` zero-padded on the left of ``dim`` (-1 or -2) to ``length``."""
    import torch.nn.functional as F

    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    return F.pad(x, (extra, 0) if dim == -1 else (0, 0, extra, 0))


def merge(cache, mask, new_cache, new_mask, select):
    """Join ``new_cache``'s rows to ``cache`` (in place) and return the joint attention mask.

    The two are left-padded to their common length and concatenated along the batch (``cache``'s
    rows first); then only the rows ``select`` (a LongTensor of indices into that concatenation,
    in the order wanted) are kept, and the leading columns that none of them attends to are cut.
    Both caches must be ``mergeable`` with as many layers; ``mask`` / ``new_mask`` are their
    [B, T] masks, T being each cache's length.
    """
    import torch

    if len(cache.layers) != len(new_cache.layers):
        raise ValueError("caches with different numbers of layers")
    T = max(mask.shape[1], new_mask.shape[1])
    joint = torch.cat([_pad_left(mask, T, -1), _pad_left(new_mask, T, -1)], dim=0)
    joint = joint.index_select(0, select)
    used = joint.any(dim=0).nonzero()
    first = int(used[0, 0]) if used.numel() else 0
    for a, b in zip(cache.layers, new_cache.layers):
        if a.keys.shape[-2] != mask.shape[1] or b.keys.shape[-2] != new_mask.shape[1]:
            raise ValueError("KV cache and attention mask lengths differ")
        for attr in ("keys", "values"):
            x = torch.cat([_pad_left(getattr(a, attr), T, -2), _pad_left(getattr(b, attr), T, -2)],
                          dim=0).index_select(0, select)
            if first:
                x = x[:, :, first:, :].contiguous()
            setattr(a, attr, x)
    return joint[:, first:].contiguous() if first else joint
