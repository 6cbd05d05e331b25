"""``VLLMSamplerEngine``: the sampler contract on vLLM's v1 ``AsyncLLM`` (one CUDA GPU).

vLLM does continuous batching and multi-LoRA serving itself; this engine maps the contract onto
it:

* every load of an adapter version is one ``LoRARequest(f"loops-v{version}-{k}", k, path)``
  with ``k`` a fresh id per load, registered with ``add_lora`` and dropped with
  ``remove_lora(k)``; a request pinned to an older version keeps using its own ``LoRARequest``
  while newer ones are loaded. vLLM keys its prefix cache by the LoRA name (by the int id in some
  versions) and its worker-side adapter cache by the int id, so giving every load its own name
  *and* id means that loading a version number a second time (from another directory) can never
  serve stale KV or stale weights. (``reset_prefix_cache`` is no substitute: it does nothing while
  any request holds KV blocks);
* a request for ``n`` samples becomes ``n`` vLLM requests with ``n=1`` and seeds ``seed + i``
  (as the HF engine does), so the i-th sample of a request seeded ``s`` is the same as the
  only sample of a request seeded ``s + i``. Seeds cover the HF engine's range, 2^64 values:
  ``(seed + i) mod 2^64``, passed as the signed int64 with the same bits (vLLM's V2 runner keeps
  seeds in an int64 array), so seeds do not collide (except one pair: :func:`vllm_seed`);
* sampled-token logprobs mean what the HF engine's mean (``loops_core.engine.GeneratedSequence``):
  the logprob under ``softmax(logits / T)`` over the *full* vocabulary, ``T = 1`` when greedy.
  vLLM 0.33 offers ``raw_logprobs`` (before temperature: wrong at T != 1) and
  ``processed_logprobs`` (after temperature *and* top-k/top-p). We use ``processed_logprobs``,
  which is exactly the contract when top-k and top-p are off (every RL recipe's setting) and for
  greedy requests (vLLM takes greedy logprobs before any processing). With top-k or top-p on,
  vLLM's values are of the truncated, renormalised distribution: at ``T = 1`` each sequence is
  rescored in one prefill (``prompt_logprobs=0`` over prompt + sample, which is raw, i.e. the
  full vocabulary at temperature 1, and the last token by ``logprob_token_ids``); at other
  temperatures no pass of vLLM yields the full-vocabulary normaliser, and the truncated values
  are returned (the one documented difference);
* ``topk_sample_logprobs`` k: vLLM's ``logprobs=k`` (the top k of the processed distribution, the
  one each token was drawn from);
* prompt logprobs ride on the first sample's request whatever its temperature: vLLM computes
  prompt logprobs from the raw logits (temperature 1) in every ``logprobs_mode``, so one prefill
  serves both; ``target_prompt_tokens`` map to ``prompt_logprob_token_ids`` (vLLM's V2 model
  runner), whose -inf for padded ids becomes 0.0; ``prompt_cache_hit_tokens`` is vLLM's
  ``num_cached_tokens`` of that request;
* ``max_tokens=0`` (``compute_logprobs``) is a one-token request whose output is dropped;
* ``max_lora_rank`` comes from the requested LoRA rank (:func:`max_lora_rank_for`: at least 64,
  rounded up to a rank vLLM supports), the same rule everywhere a vLLM sampler is built.

vLLM raises temperatures in (0, 0.01) to 0.01, and recent versions refuse temperatures above 2.
All ``vllm`` imports happen inside functions so that this module imports without vllm.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from loops_core.engine import GeneratedSequence, GenerationRequest, GenerationResult, SamplerEngine

_SAMPLING_EPS = 1e-5
SUPPORTED_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@lru_cache(maxsize=1)
def _vllm_importable() -> bool:
    try:
        importlib.import_module("vllm")
    except Exception:
        return False
    return True


def vllm_available() -> bool:
    """True when vLLM can serve here: ``vllm`` imports and torch sees a CUDA GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except Exception:
        return False
    return _vllm_importable()


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM supports that is >= ``rank``."""
    for r in SUPPORTED_LORA_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {SUPPORTED_LORA_RANKS[-1]}")


def max_lora_rank_for(rank: int | None) -> int:
    """vLLM's ``max_lora_rank`` for adapters of ``rank``: at least 64 (so a sampler started for one
    run also serves runs of the usual ranks), rounded up to a rank vLLM supports."""
    return round_lora_rank(max(64, int(rank or 0)))


def vllm_seed(seed: int) -> int:
    """``seed mod 2^64`` (the HF engine's seed space) as the signed int64 with the same bits.

    vLLM's ``SamplingParams`` reads a seed of -1 as "no seed", so 2^64 - 1 (which would be -1)
    goes to -2^63 instead: it shares its stream with 2^63, the one collision in the range."""
    s = int(seed) % (1 << 64)
    s = s - (1 << 64) if s >= (1 << 63) else s
    return -(1 << 63) if s == -1 else s


def _truncated(req: GenerationRequest) -> bool:
    return (req.top_k is not None and req.top_k > 0) or req.top_p < 1.0


def _adapter_rank(path: Path) -> int:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    ranks = [int(cfg.get("r") or 0)]
    ranks += [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def _resolve_model_path(base_model: str) -> str:
    try:
        from loops_backends.local_gpu.tiny_model import resolve_model_path
    except ImportError:  # pragma: no cover
        return base_model
    return resolve_model_path(base_model)


class VLLMSamplerEngine(SamplerEngine):
    """Sampler engine on vLLM's ``AsyncLLM``. See the module docstring.

    ``max_lora_rank`` is rounded up to a rank vLLM supports; adapters of a higher rank are
    refused by ``load_adapter``. ``max_batch_size`` maps to vLLM's ``max_num_seqs``;
    ``device`` must be CUDA (or None) and ``batch_wait_ms`` is ignored (vLLM batches
    continuously); both exist so that the engines take the same keyword arguments.
    ``engine_kwargs`` are passed on to ``AsyncEngineArgs`` last, overriding the rest.
    """

    def __init__(self, base_model: str, *, dtype: str | None = None, max_lora_rank: int | None = None,
                 max_loras: int = 4, max_cpu_loras: int | None = None,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 max_logprobs: int = 64, enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, seed: int = 0, device: str | None = None,
                 max_batch_size: int | None = None, batch_wait_ms: float | None = None,
                 engine_kwargs: dict[str, Any] | None = None, async_llm: Any = None) -> None:
        """``max_lora_rank``: the largest LoRA rank to serve (None: 64; see
        :func:`max_lora_rank_for`). ``gpu_memory_utilization``: vLLM's share of the GPU's total
        memory (``make_sampler_engine`` computes it with ``placement.py``). ``async_llm``: an
        engine object to use instead of ``AsyncLLM.from_engine_args`` (tests pass a stand-in;
        the ``AsyncEngineArgs`` are still built, so they are checked by the real class)."""
        del batch_wait_ms  # vLLM schedules continuously
        if device is not None and not str(device).startswith("cuda"):
            raise ValueError(f"the vLLM engine runs on CUDA, not {device!r}")
        import dataclasses

        from transformers import AutoTokenizer, GenerationConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        # ``logprobs_mode`` (engine-level) appeared in vLLM 0.10.1; before it the V1 engine only
        # returned raw (pre-temperature) logprobs, which would silently break the contract.
        if "logprobs_mode" not in {f.name for f in dataclasses.fields(AsyncEngineArgs)}:
            raise RuntimeError("this vLLM has no `logprobs_mode` engine argument (vLLM >= 0.10.1 "
                               "needed for temperature-scaled sampled-token logprobs)")

        self.base_model = base_model
        path = _resolve_model_path(base_model)
        self.model_path = path
        self.max_lora_rank = max_lora_rank_for(max_lora_rank)
        args: dict[str, Any] = dict(
            model=path,
            dtype=dtype or "auto",
            enable_lora=True,
            max_lora_rank=self.max_lora_rank,
            max_loras=int(max_loras),
            max_cpu_loras=int(max_cpu_loras or max(16, max_loras)),
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            max_logprobs=int(max_logprobs),
            gpu_memory_utilization=float(gpu_memory_utilization),
            enforce_eager=enforce_eager,
            seed=int(seed),
            disable_log_stats=True,
        )
        if max_model_len is not None:
            args["max_model_len"] = int(max_model_len)
        if max_batch_size is not None:
            args["max_num_seqs"] = int(max_batch_size)
        args.update(engine_kwargs or {})
        self.engine_args = AsyncEngineArgs(**args)
        if async_llm is None:
            from vllm.v1.engine.async_llm import AsyncLLM

            async_llm = AsyncLLM.from_engine_args(self.engine_args)
        self._engine = async_llm

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        mc = self._engine.model_config
        self.vocab_size = int(mc.get_vocab_size())
        self.max_seq_len = int(mc.max_model_len) if mc.max_model_len else None
        eos: list[int] = []

        def add(v):
            for x in ([v] if isinstance(v, int) else list(v or [])):
                if x is not None and int(x) not in eos:
                    eos.append(int(x))

        try:
            add(GenerationConfig.from_pretrained(path).eos_token_id)
        except Exception:  # no generation_config.json
            pass
        add(getattr(mc.hf_config, "eos_token_id", None))
        add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.max_logprobs = int(max_logprobs)
        self._loras: dict[int, Any] = {}  # version -> LoRARequest
        self._next_lora_id = 0  # vLLM lora_int_id, one per load (must be >= 1)
        self._closed = False

    # ---------------------------------------------------------------- adapters

    @property
    def loaded_versions(self) -> list[int]:
        return sorted(self._loras)

    async def load_adapter(self, version: int, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        version = int(version)
        if version < 1:
            raise ValueError(f"adapter version must be >= 1, got {version}")
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter_config.json in {path}")
        rank = _adapter_rank(path)
        if rank > self.max_lora_rank:
            raise ValueError(f"adapter rank {rank} exceeds this engine's max_lora_rank "
                             f"{self.max_lora_rank}; create the engine with a larger one")
        # A fresh (name, int id) per load: vLLM caches adapter weights by int id and prefix-cache
        # blocks by name (or by int id, depending on the version), so reusing either for new
        # weights of the same version would serve stale results.
        # LoRARequest's positional fields: lora_name, lora_int_id (>= 1), lora_path.
        self._next_lora_id += 1
        lora_id = self._next_lora_id
        lora = LoRARequest(f"loops-v{version}-{lora_id}", lora_id, str(path))
        ok = await self._engine.add_lora(lora)  # async, returns bool
        if ok is False:
            raise RuntimeError(f"vLLM refused to load adapter version {version} from {path}")
        old = self._loras.get(version)
        self._loras[version] = lora
        if old is not None:  # replaced: new requests already use the new one
            await self._engine.remove_lora(old.lora_int_id)

    async def unload_adapter(self, version: int) -> None:
        version = int(version)
        lora = self._loras.pop(version, None)
        if lora is not None:
            await self._engine.remove_lora(lora.lora_int_id)  # async; takes the int id

    # ---------------------------------------------------------------- generation

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._closed:
            raise RuntimeError("VLLMSamplerEngine is closed")
        req = request
        prompt = req.check(self.vocab_size, self.max_seq_len)
        n = int(req.n)
        version = int(req.adapter or 0)
        lora = None
        if version:
            lora = self._loras.get(version)
            if lora is None:
                raise KeyError(f"adapter version {version} is not loaded")
        plp = req.prompt_logprobs
        if plp is not None and plp < 0:
            raise ValueError("prompt_logprobs must be None or >= 0")
        for name, k in (("prompt_logprobs", plp or 0), ("topk_sample_logprobs", _topk_of(req))):
            if k > self.max_logprobs:
                raise ValueError(f"{name}={k} exceeds max_logprobs {self.max_logprobs}")
        max_new = int(req.max_tokens)
        if self.max_seq_len is not None:
            max_new = min(max_new, self.max_seq_len - len(prompt))
        sps = self.sampling_params(req, prompt, max_new)
        outs = await asyncio.gather(*(self._run(prompt, sp, lora) for sp in sps))
        result = self.to_result(req, prompt, outs, generated=n > 0 and max_new > 0)
        if n > 0 and max_new > 0 and _truncated(req) and not self._greedy(req) and req.temperature == 1.0:
            # Full-vocabulary logprobs at T = 1 for truncated sampling: rescore each sequence in
            # one prefill (see the module docstring). The prefill is prompt + all but the last
            # sampled token (so it never exceeds the context the sample fitted in): the prompt
            # logprobs (raw) score those, and the last one is asked for by id on the one token
            # the request generates (untruncated at T = 1, so processed = full vocabulary).
            rescored = await asyncio.gather(*(
                self._run(prompt + seq.tokens[:-1], self._rescore_params(seq.tokens[-1]), lora)
                for seq in result.sequences if seq.tokens))
            it = iter(rescored)
            for seq in result.sequences:
                if seq.tokens:
                    out = next(it)
                    entries = list(out.prompt_logprobs)[len(prompt):]
                    lps = [float(d[t].logprob) for t, d in zip(seq.tokens[:-1], entries)]
                    seq.logprobs = lps + [float(out.outputs[0].logprobs[0][seq.tokens[-1]].logprob)]
        return result

    @staticmethod
    def _greedy(req: GenerationRequest) -> bool:
        return req.temperature < _SAMPLING_EPS

    def sampling_params(self, req: GenerationRequest, prompt: list[int], max_new: int) -> list:
        """The vLLM ``SamplingParams`` of each request ``req`` becomes: one per sample, or one
        prefill-only request when nothing is generated (prompt logprobs only)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = int(req.n)
        greedy = self._greedy(req)
        plp = req.prompt_logprobs
        targets = getattr(req, "target_prompt_tokens", None)
        first = dict(prompt_logprobs=plp)  # one prefill: prompt logprobs are raw at any temperature
        if targets is not None:
            first["prompt_logprob_token_ids"] = [[int(t) for t in row] for row in targets]
        if n <= 0 or max_new <= 0:
            if plp is None and targets is None:
                return []
            return [SamplingParams(n=1, temperature=1.0, max_tokens=1, detokenize=False,
                                   output_kind=RequestOutputKind.FINAL_ONLY, **first)]
        topk = _topk_of(req)
        out = []
        for i in range(n):
            out.append(SamplingParams(
                n=1,
                temperature=0.0 if greedy else float(req.temperature),
                top_p=float(req.top_p),
                top_k=int(req.top_k) if req.top_k and req.top_k > 0 else 0,
                max_tokens=max_new,
                seed=None if req.seed is None else vllm_seed(int(req.seed) + i),
                stop=list(req.stop) or None,
                stop_token_ids=[int(t) for t in req.stop_token_ids] or None,
                ignore_eos=not req.stop_at_eos,
                logprobs=topk,  # 0: the sampled token's only
                skip_special_tokens=True,
                output_kind=RequestOutputKind.FINAL_ONLY,
                **(first if i == 0 else {}),
            ))
        return out

    @staticmethod
    def _rescore_params(last: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(n=1, temperature=1.0, top_k=0, top_p=1.0, max_tokens=1, prompt_logprobs=0,
                              logprob_token_ids=[int(last)], ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def to_result(self, req: GenerationRequest, prompt: list[int], outs: list, *,
                  generated: bool) -> GenerationResult:
        """vLLM's ``RequestOutput``s (in the order of :meth:`sampling_params`) -> the contract;
        ``generated``: they are samples (else one prefill-only request, or none)."""
        n = int(req.n)
        topk = _topk_of(req)
        sequences: list[GeneratedSequence] = []
        if generated:
            for out in outs:
                c = out.outputs[0]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
                tokens = [int(t) for t in c.token_ids]
                seq = GeneratedSequence(tokens=tokens, logprobs=self._token_logprobs(tokens, c.logprobs),
                                        finish_reason=c.finish_reason, text=c.text)
                if topk:
                    seq.topk = [_ranked(d, topk) for d in c.logprobs]
                sequences.append(seq)
        else:
            sequences = [GeneratedSequence(tokens=[], logprobs=[], finish_reason="length") for _ in range(n)]
        result = GenerationResult(sequences=sequences)
        if outs:
            first = outs[0]
            result.prompt_cache_hit_tokens = int(getattr(first, "num_cached_tokens", 0) or 0)
            if req.prompt_logprobs is not None:
                result.prompt_logprobs, result.prompt_topk = self._prompt_logprobs(
                    prompt, first.prompt_logprobs, int(req.prompt_logprobs))
            targets = getattr(req, "target_prompt_tokens", None)
            if targets is not None:
                table = getattr(first, "prompt_token_id_logprobs", None)
                if table is None:
                    raise RuntimeError("vLLM returned no prompt_token_id_logprobs (target_prompt_tokens "
                                       "needs vLLM's V2 model runner)")
                result.target_prompt_logprobs = [
                    [0.0 if int(t) < 0 else float(v) for t, v in zip(row, vals)]
                    for row, vals in zip(targets, table.tolist())]
        return result

    async def _run(self, prompt: list[int], sp, lora):
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # pragma: no cover - newer vLLM moved inputs around; top level has it
            from vllm import TokensPrompt

        final = None
        # AsyncLLM.generate(prompt, sampling_params, request_id, *, lora_request=...) is an async
        # generator; with RequestOutputKind.FINAL_ONLY it yields once, the finished output.
        async for out in self._engine.generate(TokensPrompt(prompt_token_ids=prompt), sp,
                                               f"loops-{uuid.uuid4().hex}", lora_request=lora):
            final = out
        if final is None:  # pragma: no cover - vLLM always yields the final output
            raise RuntimeError("vLLM returned no output")
        return final

    @staticmethod
    def _token_logprobs(tokens: list[int], logprobs) -> list[float]:
        if logprobs is None:
            raise RuntimeError("vLLM returned no logprobs for the sampled tokens")
        out = []
        for t, d in zip(tokens, logprobs):
            out.append(float(d[t].logprob))
        if len(out) != len(tokens):
            raise RuntimeError("vLLM returned logprobs for fewer tokens than it sampled")
        return out

    @staticmethod
    def _prompt_logprobs(prompt: list[int], plps, k: int):
        """vLLM's per-position dicts -> (logprob of each prompt token, top-k lists)."""
        lps: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] | None = [None] if k > 0 else None
        entries = list(plps) if plps is not None else []
        # Position 0 is None (or an empty dict in the flat format); one entry per later token.
        if len(entries) == len(prompt):
            entries = entries[1:]
        if len(entries) != len(prompt) - 1:
            raise RuntimeError(f"vLLM returned {len(entries)} prompt logprobs for a prompt of "
                               f"{len(prompt)} tokens")
        for i, d in enumerate(entries, start=1):
            lps.append(float(d[prompt[i]].logprob))
            if k > 0:
                tops.append(_ranked(d, k))
        return lps, tops

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.shutdown()


def _topk_of(req: GenerationRequest) -> int:
    return int(getattr(req, "topk_sample_logprobs", 0) or 0)


def _ranked(d, k: int) -> list[tuple[int, float]]:
    """The top ``k`` (token id, logprob) of one position's vLLM logprob dict, best first (the
    sampled token is in the dict too, ranked or not)."""
    ranked = [(int(t), float(lp.logprob), lp.rank) for t, lp in d.items()
              if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda x: (-x[1], x[2]))
    return [(t, v) for t, v, _ in ranked[:k]]
