"""The fake engines: a tiny but real language model in numpy, deterministic bit for bit.

The model (``model.py``) is a bigram LM with a LoRA delta; the losses (``losses.py``) give analytic
gradients per target; the sampler (``sampler.py``) serves the same logits. This module holds the
trainer: with ``GW`` the per-target gradients summed into a [V, V] table of dL/dlogits,
``dA = GW B^T`` and ``dB = A^T GW``; AdamW as ``torch.optim.AdamW`` does it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from loops_core.engine import DEFAULT_RUN, NonFiniteError, TrainerEngine
from loops_core.losses import get_spec
from loops_core.types import AdamParams, Datum, ForwardBackwardOutput, TensorData

from .losses import LOSS_GRADIENTS, Row
from .model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ARCH, MAX_SEQ_LEN, PEFT_A, PEFT_B, STATE_FORMAT, STATE_JSON,
                    STATE_TENSORS, base_table, init_adapter, log_softmax_rows, logit_table)
from .sampler import FakeSamplerEngine
from .tokenizer import base_vocabulary

__all__ = ["FakeTrainerEngine", "FakeSamplerEngine", "base_table", "log_softmax_rows", "logit_table",
           "LOSS_GRADIENTS", "Row"]


# What one run owns; ``use_run`` parks the current run's values and brings another's back.
_RUN_STATE = ("lora_rank", "lora_A", "lora_B", "grad_A", "grad_B", "_adam_step", "_m", "_v", "step")


class FakeTrainerEngine(TrainerEngine):
    """The bigram model plus, per run, one LoRA adapter and AdamW, all float64 numpy.

    The current run's state lives in the engine's attributes (``lora_A``, ``grad_A``, ``step``, ...);
    the other runs' states are parked in ``_parked``. Runs share only the frozen base table, so each
    run's numbers are bit-identical to the same run alone.
    """

    def __init__(self, base_model: str, *, lora_rank: int = 32, seed: int | None = None) -> None:
        self.base_model = base_model
        self.arch = ARCH
        tokenizer, self.tokenizer_id = base_vocabulary(base_model)
        self.vocab_size = len(tokenizer)
        self.max_seq_len = MAX_SEQ_LEN
        self._w0 = base_table(base_model, self.vocab_size)
        self._parked: dict[str, dict[str, Any]] = {}
        self._run: str | None = None
        self.init_lora(lora_rank, seed)

    # ---- runs ------------------------------------------------------------------------------
    def init_lora(self, rank: int, seed: int | None, *, run: str = DEFAULT_RUN) -> None:
        a, b = init_adapter(self.vocab_size, rank, seed)  # raises on a bad rank before anything changes
        self._park()
        self._parked.pop(run, None)
        self._run = run
        self.lora_A, self.lora_B = a, b
        self.lora_rank = rank
        self._zero_grads()
        self._reset_adam()
        self.step = 0

    def use_run(self, run: str) -> None:
        if run == self._run:
            return
        if run not in self._parked:
            raise LookupError(f"unknown run {run!r}")
        self._park()
        for name, value in self._parked.pop(run).items():
            setattr(self, name, value)
        self._run = run

    def close_run(self, run: str) -> None:
        if run == self._run:
            for name in _RUN_STATE:
                delattr(self, name)
            self._run = None
        self._parked.pop(run, None)

    @property
    def runs(self) -> list[str]:
        return [*([self._run] if self._run is not None else []), *self._parked]

    def _park(self) -> None:
        if self._run is not None:
            self._parked[self._run] = {name: getattr(self, name) for name in _RUN_STATE}
            self._run = None

    def _zero_grads(self) -> None:
        self.grad_A = np.zeros_like(self.lora_A)
        self.grad_B = np.zeros_like(self.lora_B)

    def _reset_adam(self) -> None:
        self._adam_step = 0
        self._m = [np.zeros_like(self.lora_A), np.zeros_like(self.lora_B)]
        self._v = [np.zeros_like(self.lora_A), np.zeros_like(self.lora_B)]

    # ---- forward / backward ----------------------------------------------------------------
    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], *,
                         backward: bool, top_k_logprobs: int = 0) -> ForwardBackwardOutput:
        cfg = {**get_spec(loss_fn).config, **config}
        logp = log_softmax_rows(logit_table(self._w0, self.lora_A, self.lora_B))
        rows = [Row(d, logp) for d in data]
        with np.errstate(all="ignore"):  # a non-finite loss is refused below, not warned about
            losses, coeffs, extra = LOSS_GRADIENTS[loss_fn](rows, cfg)
        total = float(sum(losses))
        if not math.isfinite(total):
            raise NonFiniteError(f"the {loss_fn} loss of this batch is {total}; nothing was changed "
                                 "(check the batch's weights, advantages and logprobs)")
        if backward:
            # One datum at a time, in order, so fb([x1, x2]) adds exactly what fb(x1); fb(x2) adds.
            # Into copies: a non-finite gradient must leave the accumulated one as it was.
            grad_a, grad_b = self.grad_A.copy(), self.grad_B.copy()
            with np.errstate(all="ignore"):
                for d, g in zip(rows, coeffs):
                    self._accumulate(d, g, logp, grad_a, grad_b)
            if not (np.isfinite(grad_a).all() and np.isfinite(grad_b).all()):
                raise NonFiniteError(f"the {loss_fn} gradient of this batch is not finite; nothing was changed")
            self.grad_A, self.grad_B = grad_a, grad_b
        metrics = {"loss:sum": total, "num_tokens:sum": float(sum(int(d.active.sum()) for d in rows)),
                   **extra}
        if cfg.get("skip_token_normalization"):
            metrics["skip_token_normalization"] = 1.0
        outputs = [{"logprobs": d.output(), **_top_k(logp, d.x, top_k_logprobs)} for d in rows]
        return ForwardBackwardOutput(loss=total, loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                     metrics=metrics)

    def _accumulate(self, d: Row, g: np.ndarray, logp: np.ndarray, grad_a: np.ndarray, grad_b: np.ndarray) -> None:
        """Add dL/dA and dL/dB for one datum, given ``g = dL/dlp`` per target (0 where inactive)."""
        n = len(d.x)
        g2 = g.reshape(n, -1)
        targets = np.where(d.active, d.targets, 0).reshape(n, -1)
        # dL/dlogits[t] = sum_k g[t,k] * (onehot(target[t,k]) - softmax[t])
        dlogits = -np.exp(logp[d.x]) * g2.sum(axis=1, keepdims=True)
        np.add.at(dlogits, (np.repeat(np.arange(n), g2.shape[1]), targets.ravel()), g2.ravel())
        # Only the rows of the datum's tokens are non-zero; positions with the same token share one.
        used, where = np.unique(d.x, return_inverse=True)
        dtable = np.zeros((len(used), logp.shape[1]))
        np.add.at(dtable, where, dlogits)
        grad_a[used] += dtable @ self.lora_B.T
        grad_b += self.lora_A[used].T @ dtable

    # ---- optimizer -------------------------------------------------------------------------
    def optim_step(self, params: AdamParams) -> dict[str, float]:
        """Global-norm clipping and AdamW, as ``clip_grad_norm_`` and ``torch.optim.AdamW`` do.

        Computed on copies and kept only when every result is finite."""
        grads = [self.grad_A.copy(), self.grad_B.copy()]
        norm = float(np.linalg.norm([np.linalg.norm(g) for g in grads]))
        if params.grad_clip_norm > 0:
            coef = params.grad_clip_norm / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g *= coef
        lr, b1, b2 = params.learning_rate, params.beta1, params.beta2
        adam_step = self._adam_step + 1
        bias1, bias2 = 1 - b1 ** adam_step, 1 - b2 ** adam_step
        new_p, new_m, new_v = [self.lora_A.copy(), self.lora_B.copy()], [m.copy() for m in self._m], \
            [v.copy() for v in self._v]
        with np.errstate(all="ignore"):  # overflow is checked below, not warned about
            for p, g, m, v in zip(new_p, grads, new_m, new_v):
                p *= 1 - lr * params.weight_decay  # decoupled decay, before the Adam update
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                p -= (lr / bias1) * m / (np.sqrt(v) / math.sqrt(bias2) + params.eps)
        if not all(np.isfinite(x).all() for x in (*new_p, *new_m, *new_v)):
            raise NonFiniteError("this optimizer step would make the adapter or Adam state non-finite "
                                 f"(grad norm {norm}, learning rate {lr}); nothing was changed")
        self.lora_A, self.lora_B = new_p
        self._m, self._v, self._adam_step = new_m, new_v, adam_step
        self._zero_grads()
        self.step += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": float(lr)}

    # ---- state -----------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        directory = Path(directory)
        save_file({"lora_A": self.lora_A, "lora_B": self.lora_B,
                   "adam_m.lora_A": self._m[0], "adam_m.lora_B": self._m[1],
                   "adam_v.lora_A": self._v[0], "adam_v.lora_B": self._v[1]},
                  str(directory / STATE_TENSORS))
        meta = {"format": STATE_FORMAT, "base_model": self.base_model, "lora_rank": self.lora_rank,
                "vocab_size": self.vocab_size, "step": self.step, "adam_step": self._adam_step}
        (directory / STATE_JSON).write_text(json.dumps(meta, indent=2))

    def load_state(self, directory: Path, *, with_optimizer: bool) -> None:
        directory = Path(directory)
        meta_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{directory} does not hold a fake-engine trainer state "
                             f"(expected {STATE_JSON} and {STATE_TENSORS})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, not {STATE_FORMAT!r}")
        if meta["base_model"] != self.base_model:
            raise ValueError(f"the state in {directory} is for base model {meta['base_model']!r}, "
                             f"but this engine runs {self.base_model!r}")
        if meta["lora_rank"] != self.lora_rank:
            raise ValueError(f"the state in {directory} has LoRA rank {meta['lora_rank']}, "
                             f"but this engine's adapter has rank {self.lora_rank}")
        t = load_file(str(tensor_path))
        self.lora_A, self.lora_B = t["lora_A"].astype(np.float64), t["lora_B"].astype(np.float64)
        if self.lora_A.shape != (self.vocab_size, self.lora_rank) or \
                self.lora_B.shape != (self.lora_rank, self.vocab_size):
            raise ValueError(f"the adapter tensors in {tensor_path} have the wrong shapes")
        self.step = int(meta["step"])
        self._reset_adam()
        if with_optimizer:
            self._adam_step = int(meta["adam_step"])
            self._m = [t["adam_m.lora_A"].astype(np.float64), t["adam_m.lora_B"].astype(np.float64)]
            self._v = [t["adam_v.lora_A"].astype(np.float64), t["adam_v.lora_B"].astype(np.float64)]
        self._zero_grads()

    def export_adapter(self, directory: Path) -> None:
        directory = Path(directory)
        # float64 on disk so the sampler reproduces the trainer's logits exactly.
        save_file({PEFT_A: np.ascontiguousarray(self.lora_A.T),
                   PEFT_B: np.ascontiguousarray(self.lora_B.T)},
                  str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora_rank,
                  "lora_alpha": self.lora_rank, "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": self.base_model, "target_modules": ["bigram"]}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def _top_k(logp: np.ndarray, tokens: np.ndarray, k: int) -> dict[str, TensorData]:
    """The k likeliest next tokens after each input token, best first (ties: lower id first)."""
    if k <= 0:
        return {}
    best = np.argsort(-logp[tokens], axis=1, kind="stable")[:, :k]
    return {"topk_token_ids": TensorData.from_numpy(best.astype(np.int64)),
            "topk_logprobs": TensorData.from_numpy(np.take_along_axis(logp[tokens], best, axis=1).astype(np.float32))}
