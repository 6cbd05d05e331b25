"""The fake engines: a tiny but real language model in numpy, deterministic bit for bit.

The model is a bigram LM over the fake byte tokenizer's vocabulary (V = 259). The logits for the
token that follows ``prev`` are ``W0[prev] + A[prev] @ B``:

* ``W0[V, V]`` is the frozen "base model": N(0, 1) entries drawn from ``default_rng`` seeded with
  ``zlib.crc32(base_model)``, so every base-model name is a different, varied model and the same
  name is the same model in every process (Python's ``hash()`` is salted, so it is never used).
* ``A[V, r]`` (N(0, 1/r) from the LoRA seed) and ``B[r, V]`` (zeros) are the LoRA adapter, so a
  fresh adapter is exactly the base model. ``lora_alpha = r``: the LoRA scale is 1.

Position ``i`` of a datum conditions on token ``i`` and predicts ``target_tokens[i]``. Everything
is float64; only the ``logprobs`` outputs are float32 (the wire dtype). Gradients are analytic:
each loss gives ``g = dL/dlp`` per target, ``dL/dlogits[t] = sum_k g[t,k] (onehot - softmax)``,
and with ``GW`` those rows summed into a [V, V] table, ``dA = GW B^T`` and ``dB = A^T GW``.
The trainer and the sampler build their logits with the same functions, so the sampler's prompt
logprobs equal the trainer's forward logprobs.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from loops_core.engine import (GeneratedSequence, GenerationRequest, GenerationResult,
                               SamplerEngine, TrainerEngine)
from loops_core.losses import get_spec, sampled_mask
from loops_core.types import AdamParams, Datum, ForwardBackwardOutput, TensorData

from .tokenizer import FAKE_TOKENIZER_ID, load_fake_tokenizer

ARCH = "FakeBigramLM"
MAX_SEQ_LEN = 4096
_STATE_FORMAT = "loops-fake-trainer-state/1"
_STATE_JSON = "fake_state.json"
_STATE_TENSORS = "fake_state.safetensors"
# PEFT names and layouts: lora_A.weight is [r, in], lora_B.weight is [out, r].
_PEFT_A = "base_model.model.bigram.lora_A.weight"
_PEFT_B = "base_model.model.bigram.lora_B.weight"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---- the model: shared by trainer and sampler so their numbers agree ----------------------

def _rng(seed: int) -> np.random.Generator:
    # default_rng refuses negative seeds; fold every int into the unsigned 64-bit range.
    return np.random.default_rng(seed % 2**64)


@functools.lru_cache(maxsize=8)
def base_table(base_model: str, vocab_size: int) -> np.ndarray:
    """The frozen bigram logits ``W0`` of ``base_model`` (read-only, cached)."""
    w0 = _rng(zlib.crc32(base_model.encode("utf-8"))).standard_normal((vocab_size, vocab_size))
    w0.flags.writeable = False
    return w0


def init_adapter(vocab_size: int, rank: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A fresh LoRA pair: ``A`` ~ N(0, 1/r), ``B`` = 0 (so it starts as the base model)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    a = _rng(0 if seed is None else seed).standard_normal((vocab_size, rank)) / math.sqrt(rank)
    return a, np.zeros((rank, vocab_size))


def logit_table(w0: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Row ``prev`` holds the logits of the token after ``prev``."""
    return w0 + (a @ b) * scale


def log_softmax_rows(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---- losses: each returns per-datum losses, per-target dL/dlp, and extra metrics ---------

class _Row:
    """One datum, read once: tokens ``x``, targets, the active mask, and ``lp`` (0 where inactive)."""

    def __init__(self, datum: Datum, logp: np.ndarray) -> None:
        self.datum = datum
        self.inputs = datum.loss_fn_inputs
        self.x = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        self.targets = self.inputs["target_tokens"].to_numpy().astype(np.int64)
        self.active = self.targets >= 0
        safe = np.where(self.active, self.targets, 0)
        rows = logp[self.x]  # [n, V]
        # The row index broadcasts over the K targets of [T, K] target_tokens.
        lp = rows[np.arange(len(self.x)).reshape((-1,) + (1,) * (safe.ndim - 1)), safe]
        self.lp = np.where(self.active, lp, 0.0)

    def get(self, key: str, fill: float = 0.0) -> np.ndarray:
        """A per-position float input as float64, ``fill`` where inactive (inputs may be NaN there)."""
        return np.where(self.active, self.inputs[key].to_numpy().astype(np.float64), fill)

    def weights(self) -> np.ndarray:
        if "weights" in self.inputs:
            return self.get("weights")
        return self.active.astype(np.float64)

    def output(self) -> TensorData:
        return TensorData.from_numpy(np.where(self.active, self.lp, np.nan).astype(np.float32))


LossResult = tuple[list[float], list[np.ndarray], dict[str, float]]


def _mean(parts: list[np.ndarray]) -> float:
    # An empty batch (every position masked) reports 0.0 rather than NaN, which JSON lacks.
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return float(flat.mean()) if flat.size else 0.0


def _cross_entropy(rows: list[_Row], cfg: dict[str, float]) -> LossResult:
    losses, coeffs = [], []
    for d in rows:
        w = d.weights()
        losses.append(float(-(w * d.lp).sum()))
        coeffs.append(-w)
    return losses, coeffs, {}


def _ratio_loss(kind: str) -> Callable[[list[_Row], dict[str, float]], LossResult]:
    """importance_sampling, ppo, cispo and dro: per-token losses of ``lp``, ``q`` and ``A``.

    ``weights``, when given, scale each token's loss (0 drops it), as they do for cross_entropy.
    """

    def loss(rows: list[_Row], cfg: dict[str, float]) -> LossResult:
        losses, coeffs, ratios, clipped = [], [], [], []
        for d in rows:
            lp, w, adv = d.lp, d.weights(), d.get("advantages")
            q = np.where(d.active, d.get("logprobs"), lp)  # inactive: ratio 1, no NaN
            r = np.exp(lp - q)
            if kind in ("ppo", "cispo"):
                # Per-token thresholds, when sent, override the config.
                lo, hi = (d.get(k) if k in d.inputs else cfg[k]
                          for k in ("clip_low_threshold", "clip_high_threshold"))
                rc = np.clip(r, lo, hi)
                clipped.append(((r < lo) | (r > hi))[d.active].astype(np.float64))
            if kind == "importance_sampling":
                per, g = -r * adv, -r * adv  # d(-r A)/dlp = -r A, as dr/dlp = r
            elif kind == "ppo":
                # The min picks the unclipped term (gradient -r A) or the clipped one (constant).
                unclipped = r * adv <= rc * adv
                per, g = -np.minimum(r * adv, rc * adv), np.where(unclipped, -r * adv, 0.0)
            elif kind == "cispo":
                per, g = -rc * adv * lp, -rc * adv  # the clipped ratio is a constant (sg)
            else:  # dro
                beta = cfg["beta"]
                per = -(adv * lp - beta / 2 * (lp - q) ** 2)
                g = -(adv - beta * (lp - q))
            losses.append(float((w * per).sum()))
            coeffs.append(w * g)
            ratios.append(r[d.active])
        metrics = {"ratio:mean": _mean(ratios)}
        if kind in ("ppo", "cispo"):
            metrics["clip_fraction:mean"] = _mean(clipped)
        return losses, coeffs, metrics

    return loss


def _log_sigmoid(z: float) -> float:
    return -float(np.logaddexp(0.0, -z))  # stable for large |z|


def _dpo(rows: list[_Row], cfg: dict[str, float]) -> LossResult:
    """Pairs (chosen, rejected); each pair's loss is reported on its chosen datum."""
    beta, ls = cfg["beta"], cfg["label_smoothing"]
    losses, coeffs, margins = [], [], []
    for c, r in zip(rows[0::2], rows[1::2]):
        wc, wr = c.weights(), r.weights()
        chosen = (wc * c.lp).sum() - (wc * c.get("ref_logprobs")).sum()
        rejected = (wr * r.lp).sum() - (wr * r.get("ref_logprobs")).sum()
        m = float(beta * (chosen - rejected))
        losses += [-(1 - ls) * _log_sigmoid(m) - ls * _log_sigmoid(-m), 0.0]
        dm = 0.5 * (1 + math.tanh(m / 2)) - (1 - ls)  # dloss/dm = sigmoid(m) - (1 - ls)
        coeffs += [dm * beta * wc, -dm * beta * wr]
        margins.append(m)
    return losses, coeffs, {"accuracy:mean": float(np.mean(np.asarray(margins) > 0)),
                            "margin:mean": float(np.mean(margins))}


def _gspo(rows: list[_Row], cfg: dict[str, float]) -> LossResult:
    """One ratio per datum: ``s = exp(mean of lp - q over the masked positions)``, clipped as in ppo.

    ``L = sum_t -w_t min(s A_t, clip(s) A_t)``; ``dL/ds = sum_t -w_t A_t [unclipped_t]`` and
    ``ds/dlp_t = s M_t / n``, so every masked position gets ``dL/ds * s / n``.
    """
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    losses, coeffs, ratios, clipped = [], [], [], []
    for d in rows:
        w, adv = d.weights(), d.get("advantages")
        q = np.where(d.active, d.get("logprobs"), d.lp)
        mask = d.get("sequence_ratio_mask") if "sequence_ratio_mask" in d.inputs else d.active.astype(np.float64)
        n = float(mask.sum())
        s = math.exp(float((mask * (d.lp - q)).sum()) / n) if n else 1.0
        sc = min(max(s, lo), hi)
        unclipped = s * adv <= sc * adv
        losses.append(float((w * -np.minimum(s * adv, sc * adv)).sum()))
        dl_ds = float((w * np.where(unclipped, -adv, 0.0)).sum())
        coeffs.append(dl_ds * s * mask / n if n else np.zeros_like(d.lp))
        if n:
            ratios.append(np.array([s]))
            clipped.append(np.array([float(s < lo or s > hi)]))
    return losses, coeffs, {"ratio:mean": _mean(ratios), "clip_fraction:mean": _mean(clipped)}


def _stable_reinforce(rows: list[_Row], cfg: dict[str, float]) -> LossResult:
    """``sum_t w_t S_t (-sg(r_t) A_t lp_t + kl_coeff (r_t - 1 - log r_t))`` over sampled positions
    ``S_t``; its dL/dlp is ``w_t S_t (-r_t A_t + kl_coeff (r_t - 1))`` (r is detached in the first term)."""
    kl = cfg["kl_coeff"]
    losses, coeffs, ratios, kls = [], [], [], []
    for d in rows:
        lp, adv = d.lp, d.get("advantages")
        sampled = d.active & (np.asarray(sampled_mask(d.datum)) > 0)
        w = np.where(sampled, d.weights(), 0.0)
        q = np.where(sampled, d.get("logprobs"), lp)  # elsewhere: ratio 1, no term
        r = np.exp(lp - q)
        k3 = r - 1 - (lp - q)
        losses.append(float((w * (-r * adv * lp + kl * k3)).sum()))
        coeffs.append(w * (-r * adv + kl * (r - 1)))
        ratios.append(r[sampled])
        kls.append(k3[sampled])
    return losses, coeffs, {"ratio:mean": _mean(ratios), "sampler_kl:mean": _mean(kls)}


_LOSSES: dict[str, Callable[[list[_Row], dict[str, float]], LossResult]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _ratio_loss("importance_sampling"),
    "ppo": _ratio_loss("ppo"),
    "cispo": _ratio_loss("cispo"),
    "dro": _ratio_loss("dro"),
    "dpo": _dpo,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
}


# ---- the trainer ---------------------------------------------------------------------------

class FakeTrainerEngine(TrainerEngine):
    """The bigram model plus one LoRA adapter and AdamW, all float64 numpy."""

    def __init__(self, base_model: str, *, lora_rank: int = 32, seed: int | None = None) -> None:
        self.base_model = base_model
        self.arch = ARCH
        self.tokenizer_id = FAKE_TOKENIZER_ID
        self.vocab_size = load_fake_tokenizer().vocab_size
        self.max_seq_len = MAX_SEQ_LEN
        self._w0 = base_table(base_model, self.vocab_size)
        self.init_lora(lora_rank, seed)

    def init_lora(self, rank: int, seed: int | None) -> None:
        self.lora_A, self.lora_B = init_adapter(self.vocab_size, rank, seed)
        self.lora_rank = rank
        self._zero_grads()
        self._reset_adam()
        self.step = 0

    def _zero_grads(self) -> None:
        self.grad_A = np.zeros_like(self.lora_A)
        self.grad_B = np.zeros_like(self.lora_B)

    def _reset_adam(self) -> None:
        self._adam_step = 0
        self._m = [np.zeros_like(self.lora_A), np.zeros_like(self.lora_B)]
        self._v = [np.zeros_like(self.lora_A), np.zeros_like(self.lora_B)]

    # ---- forward / backward ----------------------------------------------------------------
    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], *,
                         backward: bool) -> ForwardBackwardOutput:
        cfg = {**get_spec(loss_fn).config, **config}
        logp = log_softmax_rows(logit_table(self._w0, self.lora_A, self.lora_B))
        rows = [_Row(d, logp) for d in data]
        losses, coeffs, extra = _LOSSES[loss_fn](rows, cfg)
        if backward:
            # One datum at a time, in order, so fb([x1, x2]) adds exactly what fb(x1); fb(x2) adds.
            for d, g in zip(rows, coeffs):
                self._accumulate(d, g, logp)
        total = float(sum(losses))
        metrics = {"loss:sum": total, "num_tokens:sum": float(sum(int(d.active.sum()) for d in rows)),
                   **extra}
        if cfg.get("skip_token_normalization"):
            metrics["skip_token_normalization"] = 1.0
        return ForwardBackwardOutput(loss=total, loss_fn_output_type="ArrayRecord",
                                     loss_fn_outputs=[{"logprobs": d.output()} for d in rows],
                                     metrics=metrics)

    def _accumulate(self, d: _Row, g: np.ndarray, logp: np.ndarray) -> None:
        """Add dL/dA and dL/dB for one datum, given ``g = dL/dlp`` per target (0 where inactive)."""
        n = len(d.x)
        g2 = g.reshape(n, -1)
        targets = np.where(d.active, d.targets, 0).reshape(n, -1)
        # dL/dlogits[t] = sum_k g[t,k] * (onehot(target[t,k]) - softmax[t])
        dlogits = -np.exp(logp[d.x]) * g2.sum(axis=1, keepdims=True)
        np.add.at(dlogits, (np.repeat(np.arange(n), g2.shape[1]), targets.ravel()), g2.ravel())
        dtable = np.zeros_like(logp)
        np.add.at(dtable, d.x, dlogits)  # rows of the same prev token share one table row
        self.grad_A += dtable @ self.lora_B.T
        self.grad_B += self.lora_A.T @ dtable

    # ---- optimizer -------------------------------------------------------------------------
    def optim_step(self, params: AdamParams) -> dict[str, float]:
        """Global-norm clipping and AdamW, as ``clip_grad_norm_`` and ``torch.optim.AdamW`` do."""
        grads = [self.grad_A, self.grad_B]
        norm = float(np.linalg.norm([np.linalg.norm(g) for g in grads]))
        if params.grad_clip_norm > 0:
            coef = params.grad_clip_norm / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g *= coef
        lr, b1, b2 = params.learning_rate, params.beta1, params.beta2
        self._adam_step += 1
        bias1, bias2 = 1 - b1 ** self._adam_step, 1 - b2 ** self._adam_step
        for p, g, m, v in zip([self.lora_A, self.lora_B], grads, self._m, self._v):
            p *= 1 - lr * params.weight_decay  # decoupled decay, before the Adam update
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= (lr / bias1) * m / (np.sqrt(v) / math.sqrt(bias2) + params.eps)
        self._zero_grads()
        self.step += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": float(lr)}

    # ---- state -----------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        directory = Path(directory)
        save_file({"lora_A": self.lora_A, "lora_B": self.lora_B,
                   "adam_m.lora_A": self._m[0], "adam_m.lora_B": self._m[1],
                   "adam_v.lora_A": self._v[0], "adam_v.lora_B": self._v[1]},
                  str(directory / _STATE_TENSORS))
        meta = {"format": _STATE_FORMAT, "base_model": self.base_model, "lora_rank": self.lora_rank,
                "vocab_size": self.vocab_size, "step": self.step, "adam_step": self._adam_step}
        (directory / _STATE_JSON).write_text(json.dumps(meta, indent=2))

    def load_state(self, directory: Path, *, with_optimizer: bool) -> None:
        directory = Path(directory)
        meta_path, tensor_path = directory / _STATE_JSON, directory / _STATE_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{directory} does not hold a fake-engine trainer state "
                             f"(expected {_STATE_JSON} and {_STATE_TENSORS})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, not {_STATE_FORMAT!r}")
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
        save_file({_PEFT_A: np.ascontiguousarray(self.lora_A.T),
                   _PEFT_B: np.ascontiguousarray(self.lora_B.T)},
                  str(directory / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora_rank,
                  "lora_alpha": self.lora_rank, "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": self.base_model, "target_modules": ["bigram"]}
        (directory / _ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


# ---- the sampler ---------------------------------------------------------------------------

class FakeSamplerEngine(SamplerEngine):
    """The same bigram model; serves the base model (version 0) and loaded adapter versions.

    Stop strings are matched on the decoded text of the generated tokens (special tokens
    skipped); the text is cut just before the stop string, while the tokens keep everything up
    to and including the token that completed it. Stop tokens and eos stay in ``tokens``.
    """

    def __init__(self, base_model: str) -> None:
        self.base_model = base_model
        self.tokenizer = load_fake_tokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.max_seq_len = MAX_SEQ_LEN
        self.eos_token_ids = [self.tokenizer.eos_token_id]
        self._w0 = base_table(base_model, self.vocab_size)
        # version -> log-softmax table (temperature 1); version 0 is the base model.
        self._logp: dict[int, np.ndarray] = {0: log_softmax_rows(self._w0)}
        self._unseeded_requests = 0  # seeds the stream of requests that give no seed

    async def load_adapter(self, version: int, path: Path) -> None:
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"adapter version must be an int >= 1, got {version!r}")
        path = Path(path)
        config_path, weights_path = path / _ADAPTER_CONFIG, path / _ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(f"{path} is not a fake-engine adapter directory "
                             f"(expected {_ADAPTER_CONFIG} and {_ADAPTER_WEIGHTS})")
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path") != self.base_model:
            raise ValueError(f"the adapter in {path} is for base model "
                             f"{config.get('base_model_name_or_path')!r}, but this sampler runs "
                             f"{self.base_model!r}")
        tensors = load_file(str(weights_path))
        if _PEFT_A not in tensors or _PEFT_B not in tensors:
            raise ValueError(f"{weights_path} lacks {_PEFT_A} / {_PEFT_B}")
        a, b = tensors[_PEFT_A].T.astype(np.float64), tensors[_PEFT_B].T.astype(np.float64)
        rank = int(config["r"])
        if a.shape != (self.vocab_size, rank) or b.shape != (rank, self.vocab_size):
            raise ValueError(f"the adapter tensors in {weights_path} do not fit rank {rank} and "
                             f"vocabulary {self.vocab_size}")
        scale = float(config.get("lora_alpha", rank)) / rank
        self._logp[version] = log_softmax_rows(logit_table(self._w0, a, b, scale))

    async def unload_adapter(self, version: int) -> None:
        if version != 0:
            self._logp.pop(version, None)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        version = request.adapter or 0
        if version not in self._logp:
            raise KeyError(f"adapter version {version} is not loaded on this sampler")
        logp = self._logp[version]
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]}, outside [0, {self.vocab_size})")
        if request.seed is not None:
            rng = _rng(request.seed)
        else:
            # Unseeded requests still replay identically run to run: the n-th one gets stream n.
            rng = np.random.default_rng([0x10095, self._unseeded_requests])
            self._unseeded_requests += 1
        sequences = [self._sample(request, logp, rng) for _ in range(request.n)]
        return GenerationResult(sequences, *self._prompt_logprobs(request, logp))

    def _sample(self, req: GenerationRequest, logp: np.ndarray,
                rng: np.random.Generator) -> GeneratedSequence:
        # An empty prompt conditions on eos, the closest thing this model has to a BOS.
        prev = req.prompt[-1] if req.prompt else self.tokenizer.eos_token_id
        budget = min(req.max_tokens, max(self.max_seq_len - len(req.prompt), 0))
        tokens: list[int] = []
        logprobs: list[float] = []
        text: str | None = None
        finish = "length"
        while len(tokens) < budget:
            tok, lp = self._next_token(logp[prev], req, rng)
            tokens.append(tok)
            logprobs.append(lp)
            prev = tok
            if (req.stop_at_eos and tok in self.eos_token_ids) or tok in req.stop_token_ids:
                finish = "stop"
                break
            if req.stop:
                decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                hits = [i for i in (decoded.find(s) for s in req.stop if s) if i >= 0]
                if hits:
                    text, finish = decoded[:min(hits)], "stop"
                    break
        if text is None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GeneratedSequence(tokens=tokens, logprobs=logprobs, finish_reason=finish, text=text)

    def _next_token(self, logp_row: np.ndarray, req: GenerationRequest,
                    rng: np.random.Generator) -> tuple[int, float]:
        """Sample one token; return it with its logprob under softmax(logits / temperature)."""
        if req.temperature == 0:
            tok = int(np.argmax(logp_row))
            return tok, float(logp_row[tok])  # greedy reports temperature-1 logprobs
        # logp_row is logits minus a per-row constant, so scaling it scales the logits.
        full = logp_row if req.temperature == 1 else log_softmax_rows(logp_row / req.temperature)
        order = np.argsort(-full, kind="stable")  # best first, ties by lower id
        if 0 < req.top_k < len(order):
            order = order[:req.top_k]
        probs = np.exp(full[order])
        probs /= probs.sum()
        if req.top_p < 1:
            keep = np.cumsum(probs) - probs < req.top_p  # smallest prefix reaching top_p
            order, probs = order[keep], probs[keep] / probs[keep].sum()
        idx = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
        tok = int(order[min(idx, len(order) - 1)])
        return tok, float(full[tok])

    @staticmethod
    def _prompt_logprobs(req: GenerationRequest, logp: np.ndarray) -> tuple[list | None, list | None]:
        if req.prompt_logprobs is None:
            return None, None
        p = req.prompt
        values: list[float | None] = [None] * min(len(p), 1)
        values += [float(logp[p[i - 1], p[i]]) for i in range(1, len(p))]
        if req.prompt_logprobs <= 0:
            return values, None
        k = min(req.prompt_logprobs, logp.shape[1])
        topk: list[list[tuple[int, float]] | None] = [None] * min(len(p), 1)
        for i in range(1, len(p)):
            row = logp[p[i - 1]]
            best = np.argsort(-row, kind="stable")[:k]
            topk.append([(int(t), float(row[t])) for t in best])
        return values, topk
