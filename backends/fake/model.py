"""The fake model: a bigram LM over the fake vocabulary, plus a LoRA delta; shared by the trainer
and the sampler so their numbers agree.

The logits for the token that follows ``prev`` are ``W0[prev] + A[prev] @ B``:

* ``W0[V, V]`` is the frozen "base model": N(0, 1) entries drawn from ``default_rng`` seeded with
  ``zlib.crc32(base_model)``, so every base-model name is a different, varied model and the same
  name is the same model in every process (Python's ``hash()`` is salted, so it is never used).
* ``A[V, r]`` (N(0, 1/r) from the LoRA seed) and ``B[r, V]`` (zeros) are the LoRA adapter, so a
  fresh adapter is exactly the base model. ``lora_alpha = r``: the LoRA scale is 1.

Everything is float64; only the ``logprobs`` outputs are float32 (the wire dtype).
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np

ARCH = "FakeBigramLM"
MAX_SEQ_LEN = 4096
STATE_FORMAT = "loops-fake-trainer-state/1"
STATE_JSON = "fake_state.json"
STATE_TENSORS = "fake_state.safetensors"
# PEFT names and layouts: lora_A.weight is [r, in], lora_B.weight is [out, r].
PEFT_A = "base_model.model.bigram.lora_A.weight"
PEFT_B = "base_model.model.bigram.lora_B.weight"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def seeded_rng(seed: int) -> np.random.Generator:
    # default_rng refuses negative seeds; fold every int into the unsigned 64-bit range.
    return np.random.default_rng(seed % 2**64)


@functools.lru_cache(maxsize=8)
def base_table(base_model: str, vocab_size: int) -> np.ndarray:
    """The frozen bigram logits ``W0`` of ``base_model`` (read-only, cached)."""
    w0 = seeded_rng(zlib.crc32(base_model.encode("utf-8"))).standard_normal((vocab_size, vocab_size))
    w0.flags.writeable = False
    return w0


def init_adapter(vocab_size: int, rank: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A fresh LoRA pair: ``A`` ~ N(0, 1/r), ``B`` = 0 (so it starts as the base model)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    a = seeded_rng(0 if seed is None else seed).standard_normal((vocab_size, rank)) / math.sqrt(rank)
    return a, np.zeros((rank, vocab_size))


def logit_table(w0: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Row ``prev`` holds the logits of the token after ``prev``."""
    return w0 + (a @ b) * scale


def log_softmax_rows(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
