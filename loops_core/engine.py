"""The two engine contracts: the only places with math.

The trainer and sampler servers (``loops_core.server``) own the protocol: queues, idempotency,
ordering, long-polls, checkpoint directories and version pinning. They call an engine for the
numbers. An engine knows nothing of HTTP.

* ``TrainerEngine`` methods are synchronous: the trainer server calls them one at a time, in
  submission order, from a single worker thread, so an engine needs no locking. One engine holds
  many runs (adapter + optimizer + accumulated gradients + step each) on one base model; every
  method acts on the *current* run, which the server sets with ``use_run`` before each operation.
* ``SamplerEngine`` methods are async: the sampler server awaits many ``generate`` calls at once,
  and an engine batches them however it likes (the HF engine collects concurrent requests into one
  ``generate`` batch; vLLM does continuous batching).

Adapters travel between the two only as directories on disk (``export_adapter`` writes one,
``load_adapter`` reads one), so a sampler can run in another process or container.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .types import AdamParams, Datum, ForwardBackwardOutput


DEFAULT_RUN = "default"
MAX_TOP_K_LOGPROBS = 20


class NonFiniteError(ValueError):
    """A loss or gradient came out NaN or infinite; the operation changed nothing."""

    expected = True  # a property of the request's data, not a server fault: no traceback in the log


class TrainerEngine(abc.ABC):
    """A base model plus any number of runs, each a trainable LoRA adapter with its optimizer.

    Attributes every engine sets: ``base_model`` (the name it was created with), ``arch`` (e.g.
    ``Qwen3ForCausalLM``), ``tokenizer_id`` (what ``AutoTokenizer.from_pretrained`` or the fake
    tokenizer loader accepts), ``vocab_size``, ``max_seq_len`` (or None); and, for the current run,
    ``lora_rank`` and ``step`` (optimizer steps taken since its ``init_lora``). A run's results are
    bit-identical to the same run alone on a fresh engine: runs share nothing but the base model.

    A non-finite loss or gradient fails its operation with ``NonFiniteError`` and leaves the
    adapter, the optimizer and the accumulated gradients as they were.
    """

    base_model: str
    arch: str
    tokenizer_id: str
    vocab_size: int
    max_seq_len: int | None
    lora_rank: int
    step: int

    @abc.abstractmethod
    def init_lora(self, rank: int, seed: int | None, *, run: str = DEFAULT_RUN) -> None:
        """Create run ``run``, or reset it: a fresh adapter of ``rank``, zero gradients, fresh
        Adam, step = 0; then make it the current run. The same ``seed`` gives bit-identical
        initial adapter weights."""

    # An engine that holds many runs overrides these three; the base versions say it holds one
    # (the server then serves only its default run: ``holds_many_runs`` tells which).
    def use_run(self, run: str) -> None:
        """Make ``run`` the current run; ``LookupError`` when it does not exist."""
        if run != DEFAULT_RUN:
            raise LookupError(f"unknown run {run!r}: this engine holds only the run {DEFAULT_RUN!r}")

    def close_run(self, run: str) -> None:
        """Free ``run`` (its adapter, optimizer and gradients); unknown runs are ignored."""
        raise NotImplementedError(f"{type(self).__name__} holds one run; it cannot close it")

    @property
    def runs(self) -> list[str]:
        """The ids of the runs this engine holds."""
        return [DEFAULT_RUN]

    @classmethod
    def holds_many_runs(cls) -> bool:
        return cls.use_run is not TrainerEngine.use_run

    @abc.abstractmethod
    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], *,
                         backward: bool, top_k_logprobs: int = 0) -> ForwardBackwardOutput:
        """Run the loss (see ``loops_core.losses``) over ``data``.

        ``data`` has been validated already (keys, shapes, vocabulary); ``config`` has defaults
        filled in. With ``backward=True`` the gradient is *added* to the accumulated gradient; with
        ``backward=False`` the accumulated gradient is left exactly as it was. With
        ``top_k_logprobs`` k > 0 (at most ``MAX_TOP_K_LOGPROBS``) each loss_fn_output also holds
        ``topk_token_ids`` (int64 [L, k]) and ``topk_logprobs`` (float32 [L, k]): the k likeliest
        next tokens at every input position, best first.
        """

    @abc.abstractmethod
    def optim_step(self, params: AdamParams) -> dict[str, float]:
        """Clip (``grad_clip_norm`` > 0), apply one AdamW step, zero gradients, ``step += 1``.

        Returns metrics such as ``grad_norm:mean`` and ``learning_rate:mean``.
        """

    @abc.abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write adapter weights, Adam moments and the step into the (existing, empty) directory,
        as safetensors + JSON, never pickle."""

    @abc.abstractmethod
    def load_state(self, directory: Path, *, with_optimizer: bool) -> None:
        """Load what ``save_state`` wrote. Without ``with_optimizer`` Adam starts fresh (step kept).
        Accumulated gradients are zeroed."""

    @abc.abstractmethod
    def export_adapter(self, directory: Path) -> None:
        """Write the adapter as a PEFT directory (``adapter_config.json`` + safetensors) into the
        (existing, empty) directory, loadable by the paired ``SamplerEngine.load_adapter``."""

    def close(self) -> None:  # pragma: no cover - optional
        """Release resources (GPU memory)."""


@dataclass
class GenerationRequest:
    """One ``/sample`` call, resolved: ``max_tokens`` is set and ``adapter`` names the version."""

    prompt: list[int]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_at_eos: bool = True
    # None: no prompt logprobs. 0: the logprob of each prompt token. k > 0: also the top k.
    prompt_logprobs: int | None = None
    adapter: int | None = None  # engine adapter id to serve (the server maps run + version to it); None: base
    # k > 0: the top k (token id, logprob) of the distribution each sampled token was drawn from.
    topk_sample_logprobs: int = 0
    # [len(prompt) - 1, K] token ids: cell [i, j] asks for the logprob of that id at prompt position
    # i + 1 (temperature 1); -1 asks for nothing.
    target_prompt_tokens: list[list[int]] | None = None

    def check(self, vocab_size: int, max_seq_len: int | None) -> list[int]:
        """Engines' own guard (the server validates first): returns the prompt as ints."""
        prompt = [int(t) for t in self.prompt]
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
        if max_seq_len is not None and len(prompt) > max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len {max_seq_len}")
        if int(self.n) < 0 or self.max_tokens < 0:
            raise ValueError("n and max_tokens must be >= 0")
        return prompt


@dataclass
class GeneratedSequence:
    tokens: list[int]
    # Logprob of each sampled token under softmax(logits / temperature) over the full vocabulary
    # (temperature 1 when sampling greedily), as Tinker's RL code expects.
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    text: str = ""
    # With topk_sample_logprobs: per sampled token, its distribution's top k (id, logprob), best first.
    topk: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerationResult:
    sequences: list[GeneratedSequence]
    # One entry per prompt position, None at position 0 (nothing precedes it). Temperature 1.
    prompt_logprobs: list[float | None] | None = None
    # Top-k (token id, logprob) per prompt position, None at position 0.
    prompt_topk: list[list[tuple[int, float]] | None] | None = None
    # Prompt tokens served from a prefix cache instead of being recomputed (0: none were).
    prompt_cache_hit_tokens: int = 0
    # With target_prompt_tokens: the same [len(prompt) - 1, K] layout, 0.0 where the id was -1.
    target_prompt_logprobs: list[list[float]] | None = None


class SamplerEngine(abc.ABC):
    """A base model plus any number of loaded adapter versions.

    Attributes: ``base_model``, ``vocab_size``, ``max_seq_len`` (or None), ``eos_token_ids``.
    """

    base_model: str
    vocab_size: int
    max_seq_len: int | None
    eos_token_ids: list[int]

    @abc.abstractmethod
    async def load_adapter(self, version: int, path: Path) -> None:
        """Make the adapter directory at ``path`` servable under the id ``version`` (an int >= 1;
        the server maps each run's policy versions to ids of their own)."""

    @abc.abstractmethod
    async def unload_adapter(self, version: int) -> None:
        """Forget the adapter id ``version``; later requests for it are not made (the server checks)."""

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Sample ``request.n`` sequences. The same non-None seed gives the same tokens (on GPUs in
        bf16, batching can still flip a rare token, since kernels round differently with the batch
        size; the HF engine's ``strict_seeds`` runs seeded requests alone to rule that out)."""

    def decode(self, tokens: list[int]) -> str:  # pragma: no cover - engines override
        return ""

    async def aclose(self) -> None:  # pragma: no cover - optional
        pass
