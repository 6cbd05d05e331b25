"""``HFSamplerEngine``: the sampler contract on plain transformers + peft (CPU or one GPU).

One base model, loaded once; every published adapter version is a *named* peft LoRA adapter
(``v{version}``) on the same ``PeftModel``, added and deleted without reloading the base.

Concurrent ``generate`` calls are put on a queue (``hf_queue.py``, which also says when adapter
loads and unloads run); a single worker thread (all torch work happens there, so the event loop is
never blocked) drains up to ``max_batch_size`` sequences, waiting at most ``batch_wait_ms`` for
more, and decodes them as one left-padded batch with a KV cache. Continuous batching: sequences
queued while a batch decodes join it at the next decode step (up to ``max_batch_size`` unfinished
rows at once): they are prefilled as a mini-batch of their own and their KV cache is merged into
the running one (``kv_merge.py``). Rows of one batch may ask for different adapter versions
(peft's mixed-adapter batches: the ``adapter_names`` forward kwarg, one name per row,
``"__base__"`` for the base model) and different sampling settings.

Sampling is per row (``sampling_math.py``): temperature (< 1e-5 means greedy), top-k, top-p, and
a row-local ``torch.Generator`` seeded with the request seed (+ i for the i-th of ``n`` samples; a
random seed when None), drawn by Gumbel-max, so a row's draw depends only on its own probabilities
and seed, never on the other rows of the batch. Logprobs are those of the sampled token under
``softmax(logits / T)`` over the full vocabulary (``T = 1`` when greedy), in float32. Mixed-adapter
batches run on our own LoRA row hooks when they can (``lora_rows.py``), else on peft's.

Determinism: the same seed gives the same tokens for the same inputs and logits. Rows are
computed independently, but a GPU's matrix kernels (bf16 especially) can round differently for
different batch sizes, so on CUDA a request batched with others can see slightly different logits
than alone and, rarely (more often at high entropy), a different token. ``strict_seeds=True`` makes
seeded requests run in batches of their own, which gives identical results on every repeat.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import warnings
from collections import deque
from pathlib import Path

from loops_core.engine import GeneratedSequence, GenerationRequest, GenerationResult, SamplerEngine

from . import kv_merge
from .hf_queue import BatchQueue, Row, new_job, resolve, wants_prompt_pass
from .lora_rows import BASE as _BASE
from .lora_rows import RowLoRA
from .sampling_math import check_stop, prompt_logprobs, sample

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM does)


def _resolve_model_path(base_model: str) -> str:
    try:
        from loops_backends.local_gpu.tiny_model import resolve_model_path
    except ImportError:  # pragma: no cover - tiny_model is part of the package
        return base_model
    return resolve_model_path(base_model)


def _adapter_name(version: int) -> str:
    return f"v{version}"


def _cache_kwarg(decoder) -> str:
    """The decoder's KV-cache keyword: ``cache`` in newer transformers (``past_key_values`` is
    deprecated there), ``past_key_values`` before."""
    return _cache_kwarg_of(type(decoder))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _returned_cache(out, cache):
    """The cache a decoder output carries (under either name), else the one passed in."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return cache


def _check_targets(targets, prompt_len: int, vocab_size: int) -> None:
    """``target_prompt_tokens``: [len(prompt) - 1, K] ids in [-1, vocab_size)."""
    if targets is None:
        return
    if len(targets) != prompt_len - 1 or len({len(row) for row in targets}) > 1:
        raise ValueError(f"target_prompt_tokens must be [len(prompt) - 1 = {prompt_len - 1}, K] token ids")
    bad = [t for row in targets for t in row if not -1 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"target_prompt_tokens ids must be -1 or in [0, {vocab_size}), got {bad[:5]}")


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class HFSamplerEngine(SamplerEngine):
    """Sampler engine on transformers + peft. See the module docstring.

    ``device`` defaults to ``cuda`` when available, else ``cpu``; ``dtype`` to bfloat16 on CUDA and
    float32 on CPU. Attributes besides the contract's: ``tokenizer``, ``device``, ``dtype``,
    ``num_batches`` (batches run so far; rows joining a running batch do not start a new one),
    ``batch_sizes`` (the most rows in flight at once in each recent batch, joiners included,
    newest last), ``merges`` (times queued rows joined a running batch), ``steps_run`` (decode
    steps so far) and ``loaded_versions``.

    ``lora_fast_path`` (default on): apply plain LoRA adapters with our own row-slice hooks
    rather than peft's ``adapter_names`` mixed batches (same math, far fewer GPU syncs; see
    ``lora_rows.py``). ``strict_seeds``: run each seeded request in a batch of its own, for
    bit-identical repeats on GPUs whose kernels round differently with the batch size.
    """

    def __init__(self, base_model: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int = 64, batch_wait_ms: float = 2.0,
                 lora_fast_path: bool = True, strict_seeds: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.base_model = base_model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if not isinstance(self.dtype, torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}")
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = max(0.0, float(batch_wait_ms)) / 1000.0

        path = _resolve_model_path(base_model)
        self.model_path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self._base = model  # the transformers model (LoRA layers are injected into it in place)
        self._model = model  # what we call: the base model, or the PeftModel wrapping it
        self._peft = None  # the PeftModel, once an adapter was loaded
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        cfg = model.config
        self._softcap = getattr(cfg, "final_logit_softcapping", None)

        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        mpe = getattr(cfg, "max_position_embeddings", None)
        self.max_seq_len = int(mpe) if mpe else None
        self.eos_token_ids = self._find_eos_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self._pad_id = int(pad)

        self.lora_fast_path = bool(lora_fast_path)
        self.strict_seeds = bool(strict_seeds)
        self._lora = RowLoRA()  # how rows of one batch get their own adapters
        self._loaded: set[int] = set()  # versions whose load finished (read from the event loop)
        self.num_batches = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.merges = 0  # times queued rows joined a running batch
        self.steps_run = 0  # decode steps (batched forwards of one token per row) run so far
        self._closed = False
        # The work queue and its worker thread (hf_queue.py): all torch work runs there, in the
        # _run_batch / _do_load / _do_unload calls it makes back into this engine.
        self._queue = BatchQueue(self, thread_name="loops-hf-sampler")

    # ---------------------------------------------------------------- public API

    @property
    def loaded_versions(self) -> list[int]:
        return sorted(self._loaded)

    @property
    def _fast(self) -> bool:
        """Whether mixed-adapter batches run on our own LoRA row hooks (see ``lora_rows.py``)."""
        return self._lora.fast

    @staticmethod
    def _find_eos_ids(model, tokenizer) -> list[int]:
        ids: list[int] = []

        def add(v):
            if v is None:
                return
            for x in ([v] if isinstance(v, int) else list(v)):
                if x is not None and int(x) not in ids:
                    ids.append(int(x))

        gen = getattr(model, "generation_config", None)
        add(getattr(gen, "eos_token_id", None) if gen is not None else None)
        add(getattr(model.config, "eos_token_id", None))
        add(tokenizer.eos_token_id)
        return ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    async def load_adapter(self, version: int, path: Path) -> None:
        version = int(version)
        if version < 1:
            raise ValueError(f"adapter version must be >= 1, got {version}")
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter_config.json in {path}")
        await self._control("load", version, str(path))
        self._loaded.add(version)

    async def unload_adapter(self, version: int) -> None:
        version = int(version)
        self._loaded.discard(version)
        await self._control("unload", version)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check_alive()
        req = request
        prompt = req.check(self.vocab_size, self.max_seq_len)
        n = int(req.n)
        if req.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < req.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        version = int(req.adapter or 0)
        if version and version not in self._loaded:
            raise KeyError(f"adapter version {version} is not loaded")
        want_plp = wants_prompt_pass(req)
        if req.prompt_logprobs is not None and req.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be None or >= 0")
        _check_targets(getattr(req, "target_prompt_tokens", None), len(prompt), self.vocab_size)
        if not 0 <= int(getattr(req, "topk_sample_logprobs", 0) or 0) <= self.vocab_size:
            raise ValueError("topk_sample_logprobs must be in [0, vocab_size]")

        max_new = int(req.max_tokens)
        if self.max_seq_len is not None:
            max_new = min(max_new, self.max_seq_len - len(prompt))
        if n == 0 or max_new <= 0:
            # No decoding at all: one prefill row for the prompt logprobs, if any.
            if not want_plp:
                return GenerationResult(
                    sequences=[GeneratedSequence(tokens=[], logprobs=[], finish_reason="length")
                               for _ in range(n)])
        loop = asyncio.get_running_loop()
        job, rows = new_job(req, prompt, loop, max_new=max_new,
                            adapter=_adapter_name(version) if version else _BASE,
                            greedy=req.temperature < _SAMPLING_EPS)
        self._queue.submit(rows)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._queue.stop()
        self._peft = None
        self._model = self._base = None  # type: ignore[assignment]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    # ---------------------------------------------------------------- the queue

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("HFSamplerEngine is closed")
        if self._queue.dead is not None:
            raise RuntimeError(f"HFSamplerEngine worker died: {self._queue.dead!r}")

    async def _control(self, kind: str, version: int, path: str = "") -> None:
        self._check_alive()
        await self._queue.control(kind, version, path)

    # ---------------------------------------------------------------- adapters (worker thread)

    def _do_load(self, version: int, path: str) -> None:
        import torch
        from peft import PeftModel

        name = _adapter_name(version)
        if self._peft is not None and name in self._peft.peft_config:
            self._do_unload(version)  # loading a version again replaces it
        with torch.no_grad():
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, path, adapter_name=name, is_trainable=False,
                    torch_device=str(self.device))
            else:
                try:
                    self._peft.load_adapter(path, adapter_name=name, is_trainable=False,
                                            torch_device=str(self.device))
                except BaseException:
                    if name in self._peft.peft_config:
                        self._do_unload(version)
                    raise
        self._model = self._peft
        self._peft.eval()
        self._lm_head = self._base.get_output_embeddings()
        self._decoder = self._base.get_decoder()
        self._lora.refresh(self._peft, self.lora_fast_path)

    def _do_unload(self, version: int) -> None:
        name = _adapter_name(version)
        if self._peft is None or name not in self._peft.peft_config:
            return
        if len(self._peft.peft_config) == 1:
            # Last adapter: drop the LoRA layers altogether and go back to the plain base model.
            self._base = self._peft.unload()
            self._peft = None
            self._model = self._base
            self._lm_head = self._base.get_output_embeddings()
            self._decoder = self._base.get_decoder()
            self._lora.refresh(self._peft, self.lora_fast_path)
            return
        with warnings.catch_warnings():  # "Adapter vN was active which is now deleted"
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(name)
        self._lora.refresh(self._peft, self.lora_fast_path)

    def _logits(self, hidden):
        logits = self._lm_head(hidden).float()
        if self._softcap:
            logits = (logits / self._softcap).tanh() * self._softcap
        return logits

    # ---------------------------------------------------------------- the batch

    def _run_batch(self, rows: list[Row]) -> None:
        """Prefill ``rows`` and decode them to the end; rows queued meanwhile join between
        decode steps (``_join``) and are appended to ``rows``."""
        import torch

        # Rows of one adapter next to each other: the fast LoRA path works on contiguous slices.
        rows.sort(key=lambda r: r.job.adapter)
        self.num_batches += 1
        self.batch_sizes.append(len(rows))
        isolated = self._queue.isolated(rows[0].job)
        dev = self.device
        eos = set(self.eos_token_ids)

        with torch.inference_mode():
            cache, mask, next_pos, logits = self._prefill(rows)
            names = [r.job.adapter for r in rows]
            # ``cur`` maps positions in the (possibly pruned) device batch to ``rows`` indices.
            cur = list(range(len(rows)))
            finished_since_prune = sum(r.done for r in rows)
            while True:
                live = sum(not rows[c].done for c in cur)
                if not live:
                    break
                if not isolated and live < self.max_batch_size:
                    joined = self._join(rows, cur, names, cache, mask, next_pos, logits,
                                        self.max_batch_size - live)
                    if joined is not None:
                        cur, names, mask, next_pos, logits = joined
                        finished_since_prune = 0
                act_rows = [rows[c] for c in cur]
                toks, lps, tops = sample(logits, act_rows)
                for j, r in enumerate(act_rows):
                    if r.done:
                        continue
                    if r.job.cancelled or r.job.failed:
                        r.done = True
                        finished_since_prune += 1
                        continue
                    t = toks[j]
                    r.tokens.append(t)
                    r.logprobs.append(lps[j])
                    if tops is not None and tops[j] is not None:
                        r.topks.append(tops[j])
                    check_stop(r, t, eos, self.tokenizer)
                    if r.done:
                        finished_since_prune += 1
                        self._finish_row(r)
                if all(rows[c].done for c in cur):
                    break
                # Drop finished rows from the device batch once enough of them piled up.
                keep = [j for j, c in enumerate(cur) if not rows[c].done]
                if finished_since_prune and finished_since_prune * 4 >= len(cur) \
                        and hasattr(cache, "batch_select_indices"):
                    sel = torch.tensor(keep, dtype=torch.long, device=dev)
                    cache.batch_select_indices(sel)
                    mask = mask.index_select(0, sel)
                    next_pos = next_pos.index_select(0, sel)
                    toks = [toks[j] for j in keep]
                    cur = [cur[j] for j in keep]
                    names = [names[j] for j in keep]
                    finished_since_prune = 0
                step_ids = torch.tensor(toks, dtype=torch.long).to(dev)[:, None]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                with self._lora.adapters(self._peft, names):
                    out = self._decoder(input_ids=step_ids, attention_mask=mask,
                                        position_ids=next_pos[:, None], use_cache=True,
                                        **{_cache_kwarg(self._decoder): cache})
                    logits = self._logits(out.last_hidden_state[:, -1, :])
                cache = _returned_cache(out, cache)
                next_pos = next_pos + 1
                self.steps_run += 1
            del cache

    def _prefill(self, rows: list[Row]):
        """Run the prompts of ``rows`` (ordered by adapter) as one left-padded batch: their
        generators, prompt logprobs, and rows with nothing to generate finished. Returns the KV
        cache, the [B, L] attention mask, each row's next position and its last logits."""
        import torch

        dev = self.device
        for r in rows:
            if r.generator is None and not r.greedy and r.index >= 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(r.job.seeds[r.index])
                r.generator = g
        prompts = [r.job.req.prompt for r in rows]
        lens = [len(p) for p in prompts]
        L = max(lens)
        B = len(rows)
        ids = torch.full((B, L), self._pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        names = [r.job.adapter for r in rows]

        cache = self._new_cache()
        with self._lora.adapters(self._peft, names):
            out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=True, **{_cache_kwarg(self._decoder): cache})
            hidden = out.last_hidden_state
            last_logits = self._logits(hidden[:, -1, :])
        cache = _returned_cache(out, cache)

        for i, r in enumerate(rows):
            if r.want_prompt_lp:
                self._prompt_logprobs(r, hidden[i, L - lens[i]:, :], names[i])
        del hidden, out
        # Rows with nothing to generate are done after the prefill.
        for r in rows:
            if r.max_new <= 0:
                r.done = True
                self._finish_row(r)
        return cache, mask, pos[:, -1] + 1, last_logits

    def _join(self, rows, cur, names, cache, mask, next_pos, logits, room: int):
        """Continuous batching: prefill up to ``room`` queued rows and merge them into the
        running batch (its ``cache`` in place). None when none joined; else the new ``cur``,
        ``names``, ``mask``, ``next_pos`` and ``logits``, the batch reordered by adapter (the
        fast LoRA path wants contiguous rows) with finished rows dropped."""
        import torch

        if not kv_merge.mergeable(cache):
            return None
        new = self._queue.take_joiners(room)
        if not new:
            return None
        new.sort(key=lambda r: r.job.adapter)
        base = len(rows)
        rows.extend(new)  # before the prefill: a failure must reach these rows' callers too
        n_cache, n_mask, n_pos, n_logits = self._prefill(new)
        if all(r.done for r in new):  # prompt-logprob-only rows: nothing to decode
            return None
        if not kv_merge.mergeable(n_cache):  # pragma: no cover - same model, same cache kind
            raise RuntimeError("cannot merge the KV caches of a joining batch")
        all_cur = cur + list(range(base, base + len(new)))
        all_names = names + [r.job.adapter for r in new]
        keep = sorted((j for j, c in enumerate(all_cur) if not rows[c].done),
                      key=lambda j: all_names[j])
        sel = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = kv_merge.merge(cache, mask, n_cache, n_mask, sel)
        next_pos = torch.cat([next_pos, n_pos]).index_select(0, sel)
        logits = torch.cat([logits, n_logits]).index_select(0, sel)
        self.merges += 1
        self.batch_sizes[-1] = max(self.batch_sizes[-1], len(keep))
        return [all_cur[j] for j in keep], [all_names[j] for j in keep], mask, next_pos, logits

    def _new_cache(self):
        from transformers.cache_utils import DynamicCache

        try:
            return DynamicCache(config=self._base.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _prompt_logprobs(self, row: Row, hidden, name: str) -> None:
        """Prompt logprobs (temperature 1) of ``row``'s prompt from its prefill hidden states."""
        job = row.job
        k = min(int(job.req.prompt_logprobs or 0), self.vocab_size)
        lps, tops, named = prompt_logprobs(
            hidden, job.req.prompt, k, self.vocab_size, self._logits,
            self._lora.adapters(self._peft, [name]), getattr(job.req, "target_prompt_tokens", None))
        if job.req.prompt_logprobs is not None:
            job.prompt_logprobs, job.prompt_topk = lps, tops
        job.target_prompt_logprobs = named

    def _finish_row(self, r: Row) -> None:
        job = r.job
        if r.index >= 0:
            text = r.text if r.text is not None else self.decode(r.tokens)
            seq = GeneratedSequence(
                tokens=list(r.tokens), logprobs=[float(x) for x in r.logprobs],
                finish_reason=r.finish_reason or "length", text=text)
            if r.topk:
                seq.topk = [list(t) for t in r.topks]
            job.sequences[r.index] = seq
        job.rows_left -= 1
        if job.rows_left == 0 and not job.failed:
            result = GenerationResult(sequences=list(job.sequences),  # type: ignore[arg-type]
                                      prompt_logprobs=job.prompt_logprobs,
                                      prompt_topk=job.prompt_topk)
            # No prefix cache here: every prompt token is computed (prompt_cache_hit_tokens = 0).
            if job.target_prompt_logprobs is not None:
                result.target_prompt_logprobs = job.target_prompt_logprobs
            resolve(job.loop, job.future, result)
