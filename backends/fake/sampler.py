"""The fake sampler: the same bigram model as the trainer, serving the base model (version 0) and
loaded adapter versions, so its prompt logprobs equal the trainer's forward logprobs."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from loops_core.engine import GeneratedSequence, GenerationRequest, GenerationResult, SamplerEngine

from .model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_SEQ_LEN, PEFT_A, PEFT_B, base_table, log_softmax_rows,
                    logit_table, seeded_rng)
from .tokenizer import base_vocabulary



class FakeSamplerEngine(SamplerEngine):
    """The same bigram model; serves the base model (version 0) and loaded adapter versions.

    Stop strings are matched on the decoded text of the generated tokens (special tokens
    skipped); the text is cut just before the stop string, while the tokens keep everything up
    to and including the token that completed it. Stop tokens and eos stay in ``tokens``.
    """

    def __init__(self, base_model: str, *, cached_tables: int = 8) -> None:
        self.base_model = base_model
        self.tokenizer, _ = base_vocabulary(base_model)
        self.vocab_size = len(self.tokenizer)
        self.max_seq_len = MAX_SEQ_LEN
        self.eos_token_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self._w0 = base_table(base_model, self.vocab_size)
        self._base_logp = log_softmax_rows(self._w0)
        # adapter id -> (A, B, scale); their log-softmax tables ([V, V] each: 32 MiB at V = 2048) are
        # rebuilt on demand and only the most recently used few are kept.
        self._adapters: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_tables = cached_tables
        # Seeds the requests that give no seed, per adapter, so one run's draws never depend on another's.
        self._unseeded_requests: dict[int, int] = {}

    async def load_adapter(self, version: int, path: Path) -> None:
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"adapter version must be an int >= 1, got {version!r}")
        path = Path(path)
        config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(f"{path} is not a fake-engine adapter directory "
                             f"(expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path") != self.base_model:
            raise ValueError(f"the adapter in {path} is for base model "
                             f"{config.get('base_model_name_or_path')!r}, but this sampler runs "
                             f"{self.base_model!r}")
        tensors = load_file(str(weights_path))
        if PEFT_A not in tensors or PEFT_B not in tensors:
            raise ValueError(f"{weights_path} lacks {PEFT_A} / {PEFT_B}")
        a, b = tensors[PEFT_A].T.astype(np.float64), tensors[PEFT_B].T.astype(np.float64)
        rank = int(config["r"])
        if a.shape != (self.vocab_size, rank) or b.shape != (rank, self.vocab_size):
            raise ValueError(f"the adapter tensors in {weights_path} do not fit rank {rank} and "
                             f"vocabulary {self.vocab_size}")
        scale = float(config.get("lora_alpha", rank)) / rank
        self._adapters[version] = (a, b, scale)
        self._tables.pop(version, None)

    async def unload_adapter(self, version: int) -> None:
        self._adapters.pop(version, None)
        self._tables.pop(version, None)
        self._unseeded_requests.pop(version, None)

    def _table(self, version: int) -> np.ndarray:
        """The log-softmax table (temperature 1) of an adapter id; 0 is the base model."""
        if version == 0:
            return self._base_logp
        if version not in self._adapters:
            raise KeyError(f"adapter version {version} is not loaded on this sampler")
        if version in self._tables:
            self._tables.move_to_end(version)
        else:
            self._tables[version] = log_softmax_rows(logit_table(self._w0, *self._adapters[version]))
            while len(self._tables) > self._cached_tables:
                self._tables.popitem(last=False)
        return self._tables[version]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        version = request.adapter or 0
        logp = self._table(version)
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]}, outside [0, {self.vocab_size})")
        if request.seed is not None:
            rng = seeded_rng(request.seed)
        else:
            # Unseeded requests still replay identically run to run: the n-th one gets stream n.
            count = self._unseeded_requests.get(version, 0)
            rng = np.random.default_rng([0x10095, count] + ([version] if version else []))
            self._unseeded_requests[version] = count + 1
        sequences = [self._sample(request, logp, rng) for _ in range(request.n)]
        return GenerationResult(sequences, *self._prompt_logprobs(request, logp),
                                target_prompt_logprobs=_target_logprobs(request, logp))

    def _sample(self, req: GenerationRequest, logp: np.ndarray,
                rng: np.random.Generator) -> GeneratedSequence:
        # An empty prompt conditions on eos, the closest thing this model has to a BOS.
        prev = req.prompt[-1] if req.prompt else self.tokenizer.eos_token_id
        budget = min(req.max_tokens, max(self.max_seq_len - len(req.prompt), 0))
        tokens: list[int] = []
        logprobs: list[float] = []
        topk: list[list[tuple[int, float]]] | None = [] if req.topk_sample_logprobs > 0 else None
        text: str | None = None
        finish = "length"
        while len(tokens) < budget:
            tok, lp, full = self._next_token(logp[prev], req, rng)
            tokens.append(tok)
            logprobs.append(lp)
            if topk is not None:
                best = np.argsort(-full, kind="stable")[:req.topk_sample_logprobs]
                topk.append([(int(t), float(full[t])) for t in best])
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
        return GeneratedSequence(tokens=tokens, logprobs=logprobs, finish_reason=finish, text=text, topk=topk)

    def _next_token(self, logp_row: np.ndarray, req: GenerationRequest,
                    rng: np.random.Generator) -> tuple[int, float, np.ndarray]:
        """Sample one token; return it, its logprob under softmax(logits / temperature), and that
        distribution's log-probabilities."""
        if req.temperature == 0:
            tok = int(np.argmax(logp_row))
            return tok, float(logp_row[tok]), logp_row  # greedy reports temperature-1 logprobs
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
        return tok, float(full[tok]), full

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


def _target_logprobs(req: GenerationRequest, logp: np.ndarray) -> list[list[float]] | None:
    """Cell [i, j]: the logprob of id ``targets[i][j]`` at prompt position i + 1; 0.0 where it is -1."""
    if req.target_prompt_tokens is None:
        return None
    return [[float(logp[req.prompt[i], t]) if t >= 0 else 0.0 for t in row]
            for i, row in enumerate(req.target_prompt_tokens)]
