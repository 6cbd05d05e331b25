"""Optional fused kernels from ``liger-kernel``, used on CUDA when it is installed.

* :func:`fused_target_logprobs`: target logprobs through liger's fused linear cross-entropy,
  which never materialises a chunk of ``[tokens x vocab]`` logits. Used only where no gradient
  flows through the logprobs (``forward`` calls, and the top-k-free logprobs of a no-grad pass):
  liger before 0.8.5 computes its input gradient during the forward assuming the upstream
  gradient of the (per-token) loss is one scalar, which an RL loss's per-token weights are not
  (0.8.5 defers and recomputes it with per-token gradients; using it with gradients waits for a
  CUDA agreement test of that path).
* :func:`patch_model`: liger's RMSNorm, SwiGLU and RoPE for the model families it knows. They
  call the projections as modules, so LoRA-wrapped projections keep working.

The trainer chooses them automatically (``TrainerConfig.fused_ce="auto"``); ``"off"`` turns them
off. ``tests/test_local_trainer.py`` checks agreement with the plain path on CUDA.
"""

from __future__ import annotations

import functools
import importlib
import logging

from torch import Tensor, nn

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def liger_available() -> bool:
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception:  # not installed, or no triton / no GPU build
        return False
    return True


def fused_target_logprobs(hidden: Tensor, lm_head: nn.Module, targets: Tensor,
                          softcap: float | None) -> Tensor:
    """``log_softmax(lm_head(hidden))[targets]`` for [n, H] rows and [n] targets (all >= 0), no grad."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    weight = lm_head.weight
    out = liger_fused_linear_cross_entropy(hidden.to(weight.dtype).contiguous(), weight, targets.contiguous(),
                                           getattr(lm_head, "bias", None), reduction="none", softcap=softcap)
    loss = out[0] if isinstance(out, tuple) else out
    return -loss.float()


_PATCHES = {"qwen3": "apply_liger_kernel_to_qwen3", "qwen2": "apply_liger_kernel_to_qwen2",
            "llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral"}


def patch_model(model: nn.Module) -> bool:
    """Swap in liger's RMSNorm, SwiGLU and RoPE where it has them for this family; True if done.
    Its loss patches stay off: the trainer computes its own logprobs."""
    name = _PATCHES.get(getattr(model.config, "model_type", ""))
    if name is None or not liger_available():
        return False
    try:
        apply = getattr(importlib.import_module("liger_kernel.transformers"), name)
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
              model=model)
    except Exception as e:  # a liger that does not know this transformers: run without it
        logger.warning("liger-kernel could not patch %s (%s); running without it", type(model).__name__, e)
        return False
    return True
