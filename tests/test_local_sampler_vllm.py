"""VLLMSamplerEngine: the contract mapping against the real ``vllm`` package, and the engine itself.

* The mapping tests (``test_mapping_*``) run everywhere: they build a side venv with the real
  ``vllm==0.33.0`` (``tests/sidevenv.py``; it brings its own CUDA torch and imports without a GPU)
  and drive ``drive_vllm_mapping`` below in it: the engine builds real ``AsyncEngineArgs``,
  ``SamplingParams``, ``LoRARequest`` and ``TokensPrompt``; only the engine object is a stand-in
  (``StandInAsyncLLM``: ``AsyncLLM.from_engine_args`` needs a GPU), and it answers with real
  ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` values.
* The engine tests need ``vllm`` and a CUDA GPU here, else they are skipped. vLLM runs the model in bfloat16 while the reference forwards run in float32, so logprobs are
compared with a loose tolerance and greedy tokens are checked to be (near-)argmax tokens of the
reference rather than identical to its greedy decode.
"""

from __future__ import annotations

import asyncio
import json

import pytest

torch = pytest.importorskip("torch")


def _vllm_here() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(not _vllm_here(), reason="vLLM engine tests need vllm and a CUDA GPU")

from loops_core.engine import GenerationRequest  # noqa: E402

TOL = 0.15  # bf16 (vLLM) against fp32 (reference)
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village near the mountains, there lived",
    "def add(a, b):",
]


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def run(loop):
    # AsyncLLM binds its output handler to one event loop: keep every call on the same one.
    return loop.run_until_complete


@pytest.fixture(scope="module")
def model_dir():
    from loops_backends.local_gpu.tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="module")
def engine(model_dir, run):
    from loops_backends.local_gpu.sampler_vllm import VLLMSamplerEngine

    eng = VLLMSamplerEngine("loops/tiny-qwen3", dtype="bfloat16", max_lora_rank=8,
                            gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=1024)
    yield eng
    run(eng.aclose())


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def _load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda").eval()


@pytest.fixture(scope="module")
def ref(model_dir):
    return _load_base(model_dir)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    out = {}
    specs = {
        1: dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
        2: dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"], seed=2),
    }
    for version, spec in specs.items():
        seed = spec.pop("seed")
        torch.manual_seed(seed)
        pm = get_peft_model(_load_base(model_dir),
                            LoraConfig(init_lora_weights=False, lora_dropout=0.0, **spec))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        d = tmp_path_factory.mktemp(f"vadapter{version}")
        pm.save_pretrained(d)
        out[version] = d
    return out


@pytest.fixture(scope="module")
def ref_adapters(model_dir, adapter_dirs):
    from peft import PeftModel

    return {v: PeftModel.from_pretrained(_load_base(model_dir), str(d)).eval()
            for v, d in adapter_dirs.items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()


def _check_against(model, prompt, seq, temperature=1.0, greedy=False):
    full = prompt + seq.tokens
    lg = _logits(model, full)[len(prompt) - 1:len(full) - 1]
    T = 1.0 if greedy else temperature
    lp = torch.log_softmax(lg / T, dim=-1)
    toks = torch.tensor(seq.tokens)[:, None]
    want = lp.gather(1, toks)[:, 0]
    assert torch.allclose(torch.tensor(seq.logprobs), want, atol=TOL, rtol=0), (seq.logprobs, want)
    if greedy:  # the chosen token is (within bf16 noise) the argmax
        assert bool((want >= lp.max(-1).values - TOL).all())


@requires_gpu
def test_attributes(engine, ref):
    assert engine.vocab_size == ref.get_input_embeddings().weight.shape[0]
    assert engine.max_seq_len == 1024
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids


@requires_gpu
def test_greedy_and_logprobs(engine, tok, ref, run):
    p = tok.encode(PROMPTS[1])
    res = run(engine.generate(GenerationRequest(prompt=p, max_tokens=10, temperature=0.0,
                                                stop_at_eos=False)))
    (seq,) = res.sequences
    assert len(seq.tokens) == len(seq.logprobs) == 10 and seq.finish_reason == "length"
    _check_against(ref, p, seq, greedy=True)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@requires_gpu
def test_sampled_logprobs_are_temperature_scaled(engine, tok, ref, run, temperature):
    p = tok.encode(PROMPTS[0])
    res = run(engine.generate(GenerationRequest(prompt=p, n=2, max_tokens=8,
                                                temperature=temperature, seed=3,
                                                stop_at_eos=False)))
    for seq in res.sequences:
        _check_against(ref, p, seq, temperature=temperature)


@requires_gpu
def test_truncated_sampling_at_temperature_one_reports_full_vocabulary_logprobs(engine, tok, ref, run):
    """top-p / top-k at T = 1: the HF engine's meaning (full vocabulary), via the rescoring prefill."""
    p = tok.encode(PROMPTS[1])
    res = run(engine.generate(GenerationRequest(prompt=p, n=2, max_tokens=8, temperature=1.0, top_p=0.8,
                                                top_k=20, seed=4, stop_at_eos=False)))
    for seq in res.sequences:
        _check_against(ref, p, seq, temperature=1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@requires_gpu
def test_prompt_logprobs(engine, tok, ref, run, temperature):
    p = tok.encode(PROMPTS[1])
    res = run(engine.generate(GenerationRequest(prompt=p, max_tokens=2, temperature=temperature,
                                                seed=1, prompt_logprobs=4)))
    lp = torch.log_softmax(_logits(ref, p), dim=-1)
    assert len(res.prompt_logprobs) == len(p) and res.prompt_logprobs[0] is None
    want = torch.tensor([lp[i - 1, p[i]].item() for i in range(1, len(p))])
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), want, atol=TOL)
    assert len(res.prompt_topk) == len(p) and res.prompt_topk[0] is None
    for i in range(1, len(p)):
        top = res.prompt_topk[i]
        assert len(top) == 4
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        for t, v in top:
            assert abs(lp[i - 1, t].item() - v) <= TOL


@requires_gpu
def test_compute_logprobs_with_max_tokens_zero(engine, tok, ref, run):
    p = tok.encode(PROMPTS[0])
    res = run(engine.generate(GenerationRequest(prompt=p, max_tokens=0, prompt_logprobs=0)))
    assert [s.tokens for s in res.sequences] == [[]]
    assert res.prompt_topk is None and res.prompt_logprobs[0] is None
    lp = torch.log_softmax(_logits(ref, p), dim=-1)
    want = torch.tensor([lp[i - 1, p[i]].item() for i in range(1, len(p))])
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), want, atol=TOL)


@requires_gpu
def test_seeds(engine, tok, run):
    p = tok.encode(PROMPTS[2])
    req = dict(prompt=p, n=3, max_tokens=10, temperature=1.0, seed=7, stop_at_eos=False)

    async def both():
        return await asyncio.gather(engine.generate(GenerationRequest(**req)),
                                    engine.generate(GenerationRequest(**{**req, "seed": 8})),
                                    engine.generate(GenerationRequest(**req)))

    a, c, b = run(both())
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    d = run(engine.generate(GenerationRequest(**{**req, "n": 1, "seed": 9})))
    assert d.sequences[0].tokens == a.sequences[2].tokens


@requires_gpu
def test_stops(engine, tok, run):
    p = tok.encode(PROMPTS[0])
    sampled = dict(prompt=p, max_tokens=16, temperature=1.5, seed=1234)
    full = run(engine.generate(GenerationRequest(**sampled, stop_at_eos=False))).sequences[0]
    assert full.finish_reason == "length" and len(full.tokens) == 16
    stop_tok = full.tokens[3]
    cut = full.tokens.index(stop_tok)
    s1 = run(engine.generate(GenerationRequest(**sampled, stop_token_ids=[stop_tok],
                                               stop_at_eos=False))).sequences[0]
    assert s1.tokens == full.tokens[:cut + 1] and s1.finish_reason == "stop"
    pre = engine.decode(full.tokens[:3])
    stop = full.text[max(0, len(pre) - 1):len(pre) + 1]
    s2 = run(engine.generate(GenerationRequest(**sampled, stop=[stop],
                                               stop_at_eos=False))).sequences[0]
    assert s2.finish_reason == "stop" and s2.text == full.text[:full.text.find(stop)]
    assert s2.tokens == full.tokens[:len(s2.tokens)]
    m = run(engine.generate(GenerationRequest(**{**sampled, "max_tokens": 3},
                                              stop_at_eos=False))).sequences[0]
    assert m.tokens == full.tokens[:3] and m.finish_reason == "length"


@requires_gpu
def test_adapters(engine, tok, run, adapter_dirs, ref_adapters, ref):
    p = tok.encode(PROMPTS[1])
    greedy = dict(prompt=p, max_tokens=8, temperature=0.0, prompt_logprobs=0, stop_at_eos=False)
    run(engine.load_adapter(1, adapter_dirs[1]))
    v1 = run(engine.generate(GenerationRequest(**greedy, adapter=1)))
    _check_against(ref_adapters[1], p, v1.sequences[0], greedy=True)
    run(engine.load_adapter(2, adapter_dirs[2]))
    assert engine.loaded_versions == [1, 2]
    v2 = run(engine.generate(GenerationRequest(**greedy, adapter=2)))
    _check_against(ref_adapters[2], p, v2.sequences[0], greedy=True)
    lp2 = torch.log_softmax(_logits(ref_adapters[2], p), dim=-1)
    want = torch.tensor([lp2[i - 1, p[i]].item() for i in range(1, len(p))])
    assert torch.allclose(torch.tensor(v2.prompt_logprobs[1:]), want, atol=TOL)

    async def mixed():
        return await asyncio.gather(
            engine.generate(GenerationRequest(**greedy, adapter=1)),
            engine.generate(GenerationRequest(**greedy, adapter=2)),
            engine.generate(GenerationRequest(**greedy)))

    m1, m2, mb = run(mixed())  # the pinned old version is still served next to the new one
    assert m1.sequences[0].tokens == v1.sequences[0].tokens
    assert m2.sequences[0].tokens == v2.sequences[0].tokens
    _check_against(ref, p, mb.sequences[0], greedy=True)

    run(engine.unload_adapter(1))
    assert engine.loaded_versions == [2]
    with pytest.raises(KeyError):
        run(engine.generate(GenerationRequest(**greedy, adapter=1)))
    again = run(engine.generate(GenerationRequest(**greedy, adapter=2)))
    assert again.sequences[0].tokens == v2.sequences[0].tokens

    # Reloading a version number with other weights serves the new weights, never cached ones.
    run(engine.load_adapter(2, adapter_dirs[1]))
    reloaded = run(engine.generate(GenerationRequest(**greedy, adapter=2)))
    _check_against(ref_adapters[1], p, reloaded.sequences[0], greedy=True)
    assert engine.loaded_versions == [2]
    run(engine.unload_adapter(2))
    assert engine.loaded_versions == []


@requires_gpu
def test_factory_picks_vllm(monkeypatch):
    from loops_backends.local_gpu import samplers

    monkeypatch.delenv("LOOPS_SAMPLER_ENGINE", raising=False)
    assert samplers.vllm_available()


# --------------------------------------------------------------------------------------------
# The mapping, against the real vllm package in a side venv (no GPU needed)
# --------------------------------------------------------------------------------------------

VLLM_PIN = "vllm==0.33.0"

DRIVER = r'''
import asyncio, json, math, sys
import numpy as np
from types import SimpleNamespace

model_dir, adapter_dir, big_adapter_dir = sys.argv[1:4]
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput

from loops_backends.local_gpu.sampler_vllm import VLLMSamplerEngine, vllm_seed

VOCAB = 256
NEW_FIELDS = ("topk_sample_logprobs", "target_prompt_tokens")


def GenerationRequest(**kw):  # noqa: N802 - the contract's request; newer fields set where it lacks them
    from loops_core.engine import GenerationRequest as Request

    fields = set(Request.__dataclass_fields__)
    extra = {k: kw.pop(k) for k in NEW_FIELDS if k in kw and k not in fields}
    req = Request(**kw)
    for k, v in extra.items():
        setattr(req, k, v)
    return req


class StandInAsyncLLM:
    """Stand-in for vLLM's AsyncLLM (which needs a GPU): records what it is given and answers
    with real RequestOutput / CompletionOutput / Logprob values computed from the request."""

    def __init__(self):
        self.model_config = SimpleNamespace(get_vocab_size=lambda: VOCAB, max_model_len=1024,
                                            hf_config=SimpleNamespace(eos_token_id=2))
        self.calls, self.loras = [], {}

    async def add_lora(self, lora):
        assert isinstance(lora, LoRARequest)
        self.loras[lora.lora_int_id] = lora
        return True

    async def remove_lora(self, lora_id):
        self.loras.pop(lora_id)
        return True

    def shutdown(self):
        pass

    async def generate(self, prompt, sp, request_id, *, lora_request=None):
        assert isinstance(sp, SamplingParams)
        ids = list(prompt["prompt_token_ids"])
        self.calls.append(dict(prompt=ids, sp=sp, lora=lora_request.lora_name if lora_request else None))
        seed = 0 if sp.seed is None else sp.seed
        tokens = [(abs(seed) + 7 * j) % 200 + 3 for j in range(sp.max_tokens)]
        k = sp.logprobs or 0
        lps = []
        for j, t in enumerate(tokens):
            d = {t: Logprob(logprob=-0.25 * (j + 1), rank=1 if k else None)}
            for t_id in sp.logprob_token_ids or []:  # asked for by id: an (arbitrary) raw value
                d[t_id] = Logprob(logprob=-0.125 * (t_id % 7 + 1), rank=None)
            for r in range(2, k + 1):
                d[(t + r) % VOCAB] = Logprob(logprob=-0.25 * (j + 1) - r, rank=r)
            lps.append(d)
        plps = None
        if sp.prompt_logprobs is not None:
            plps = [None]
            for i, t in enumerate(ids[1:], start=1):
                d = {t: Logprob(logprob=-0.01 * i, rank=5)}
                for r in range(1, sp.prompt_logprobs + 1):
                    d[(t + 100 + r) % VOCAB] = Logprob(logprob=-0.001 * r, rank=r)
                plps.append(d)
        table = None
        if sp.prompt_logprob_token_ids is not None:
            rows = np.asarray(sp.prompt_logprob_token_ids)
            table = np.where(rows < 0, -np.inf, -rows / 1000.0)
        c = CompletionOutput(index=0, text="x" * len(tokens), token_ids=tokens, cumulative_logprob=None,
                             logprobs=lps, finish_reason="length")
        yield RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=ids, prompt_logprobs=plps,
                            outputs=[c], finished=True, num_cached_tokens=4, prompt_token_id_logprobs=table)


async def main():
    stand_in = StandInAsyncLLM()
    eng = VLLMSamplerEngine(model_dir, max_lora_rank=100, gpu_memory_utilization=0.41, async_llm=stand_in)
    a = eng.engine_args
    out = {"engine_args": dict(type=type(a).__name__, max_lora_rank=a.max_lora_rank,
                               logprobs_mode=a.logprobs_mode, gpu=a.gpu_memory_utilization,
                               enable_lora=a.enable_lora)}
    prompt = [5, 6, 7, 8, 9]
    # Seeds: the HF engine's 2^64 values, as signed int64; no collisions at 2^63.
    r = await eng.generate(GenerationRequest(prompt=prompt, n=3, max_tokens=4, temperature=0.7,
                                             seed=2**64 - 1, prompt_logprobs=2, topk_sample_logprobs=3,
                                             target_prompt_tokens=[[6, -1], [7, 1], [8, -1], [9, 9]]))
    sps = [c["sp"] for c in stand_in.calls]
    out["seeds"] = [sp.seed for sp in sps]
    out["calls_for_n3"] = len(stand_in.calls)
    out["prompt_logprobs_on"] = [sp.prompt_logprobs for sp in sps]
    out["logprobs_k"] = [sp.logprobs for sp in sps]
    out["targets_on_first"] = sps[0].prompt_logprob_token_ids is not None and all(
        sp.prompt_logprob_token_ids is None for sp in sps[1:])
    out["result"] = dict(tokens=[s.tokens for s in r.sequences], logprobs=[s.logprobs for s in r.sequences],
                         topk=[s.topk for s in r.sequences], prompt_logprobs=r.prompt_logprobs,
                         prompt_topk=r.prompt_topk, cache_hit=r.prompt_cache_hit_tokens,
                         targets=r.target_prompt_logprobs)
    out["seed_2_63"] = [vllm_seed(2**63 - 1), vllm_seed(2**63), vllm_seed(-1)]
    # Truncated sampling at T = 1: one rescoring prefill per sequence (full vocabulary).
    stand_in.calls.clear()
    r = await eng.generate(GenerationRequest(prompt=prompt, n=2, max_tokens=3, temperature=1.0, top_p=0.9, seed=1))
    out["truncated"] = dict(calls=len(stand_in.calls), rescore_prompts=[c["prompt"] for c in stand_in.calls[2:]],
                            rescore_ids=[c["sp"].logprob_token_ids for c in stand_in.calls[2:]],
                            rescore_temperature=[(c["sp"].temperature, c["sp"].top_p, c["sp"].top_k)
                                                 for c in stand_in.calls[2:]],
                            logprobs=[s.logprobs for s in r.sequences], tokens=[s.tokens for s in r.sequences])
    # Truncated at T = 0.8: no rescoring; greedy: no rescoring.
    stand_in.calls.clear()
    await eng.generate(GenerationRequest(prompt=prompt, n=1, max_tokens=2, temperature=0.8, top_k=5))
    await eng.generate(GenerationRequest(prompt=prompt, n=1, max_tokens=2, temperature=0.0, top_k=5))
    out["no_rescore_calls"] = len(stand_in.calls)
    out["greedy_temperature"] = stand_in.calls[-1]["sp"].temperature
    # Prompt logprobs only (max_tokens=0): one prefill, no samples.
    stand_in.calls.clear()
    r = await eng.generate(GenerationRequest(prompt=prompt, n=1, max_tokens=0, prompt_logprobs=0))
    out["prefill_only"] = dict(calls=len(stand_in.calls), max_tokens=stand_in.calls[0]["sp"].max_tokens,
                               seqs=[s.tokens for s in r.sequences], plp=r.prompt_logprobs)
    # Adapters: rank checks against max_lora_rank; real LoRARequests.
    await eng.load_adapter(1, adapter_dir)
    stand_in.calls.clear()
    await eng.generate(GenerationRequest(prompt=prompt, n=1, max_tokens=1, adapter=1))
    out["lora_name"] = stand_in.calls[0]["lora"]
    try:
        await eng.load_adapter(2, big_adapter_dir)
        out["big_adapter"] = "loaded"
    except ValueError as e:
        out["big_adapter"] = str(e)
    print("RESULT " + json.dumps(out))


asyncio.run(main())
'''


@pytest.fixture(scope="module")
def vllm_python():
    import subprocess

    from sidevenv import side_venv

    import hashlib
    import tomllib
    from pathlib import Path

    exe = side_venv("vllm", [VLLM_PIN], python=(3, 12))
    # loops_core's own (pure-Python) dependencies, the ones vllm does not bring along, added to the
    # cached venv once per dependency list (pip leaves the ones already satisfied alone).
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    marker = Path(exe).parent.parent / f".loops-deps-{hashlib.sha256(repr(sorted(deps)).encode()).hexdigest()[:12]}"
    if not marker.exists():
        done = subprocess.run([str(exe), "-m", "pip", "install", "-q", *deps], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not add loops' dependencies to the vllm side venv: {done.stderr[-300:]}")
        marker.touch()
    return exe


def _adapter(tmp_path, name, r):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 32, "peft_type": "LORA",
                                                       "target_modules": ["q_proj"]}))
    return d


@pytest.fixture(scope="module")
def mapping(vllm_python, tmp_path_factory):
    """Runs the driver once in the side venv; returns what it printed."""
    import subprocess
    import sys
    from pathlib import Path

    from loops_backends.local_gpu.tiny_model import tiny_model_path

    tmp = tmp_path_factory.mktemp("vllm_mapping")
    shim = tmp / "shim"
    shim.mkdir()
    repo = Path(__file__).resolve().parent.parent
    (shim / "loops_backends").symlink_to(repo / "backends")  # the import name pyproject gives backends/
    (tmp / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{repo}:{shim}"
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([str(vllm_python), str(tmp / "driver.py"), str(tiny_model_path()),
                           str(_adapter(tmp, "a", 16)), str(_adapter(tmp, "b", 256))],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp))
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({sys.executable}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_mapping_engine_args(mapping):
    a = mapping["engine_args"]
    assert a == dict(type="AsyncEngineArgs", max_lora_rank=128, logprobs_mode="processed_logprobs", gpu=0.41,
                     enable_lora=True)


def test_mapping_seeds_cover_the_hf_engines_range(mapping):
    # (2^64 - 1 + i) mod 2^64 as signed int64; vLLM reads -1 as "no seed", so 2^64 - 1 -> -2^63.
    assert mapping["seeds"] == [-(2**63), 0, 1]
    assert mapping["seed_2_63"] == [2**63 - 1, -(2**63), -(2**63)]


def test_mapping_one_prefill_for_prompt_logprobs_and_targets(mapping):
    assert mapping["calls_for_n3"] == 3  # no separate temperature-1 prefill at T = 0.7
    assert mapping["prompt_logprobs_on"] == [2, None, None]
    assert mapping["targets_on_first"]
    r = mapping["result"]
    assert r["prompt_logprobs"] == [None, -0.01, -0.02, -0.03, -0.04]
    assert r["prompt_topk"][0] is None and len(r["prompt_topk"][1]) == 2
    assert r["prompt_topk"][1] == [[6 + 101, -0.001], [6 + 102, -0.002]]
    assert r["targets"] == [[-0.006, 0.0], [-0.007, -0.001], [-0.008, 0.0], [-0.009, -0.009]]
    assert r["cache_hit"] == 4


def test_mapping_sampled_tokens_logprobs_and_topk(mapping):
    r = mapping["result"]
    assert mapping["logprobs_k"] == [3, 3, 3]
    assert r["logprobs"][0] == [-0.25, -0.5, -0.75, -1.0]
    first = r["topk"][0][0]
    assert [t for t, _ in first] == [r["tokens"][0][0], (r["tokens"][0][0] + 2) % 256, (r["tokens"][0][0] + 3) % 256]
    assert [v for _, v in first] == [-0.25, -2.25, -3.25]


def test_mapping_truncated_sampling_is_rescored_at_temperature_one(mapping):
    t = mapping["truncated"]
    assert t["calls"] == 4  # two samples + one rescoring prefill each
    # prompt + all but the last token (never longer than the sample's own context) ...
    assert t["rescore_prompts"] == [[5, 6, 7, 8, 9] + toks[:-1] for toks in t["tokens"]]
    # ... and the last token asked for by id, at T = 1 without truncation.
    assert t["rescore_ids"] == [[toks[-1]] for toks in t["tokens"]]
    assert t["rescore_temperature"] == [[1.0, 1.0, 0]] * 2
    # The rescoring prefill's (raw, full-vocabulary) logprobs replace vLLM's truncated ones.
    last = t["tokens"][0][-1]
    assert t["logprobs"][0] == [-0.05, -0.06, -0.125 * (last % 7 + 1)]
    assert mapping["no_rescore_calls"] == 2 and mapping["greedy_temperature"] == 0.0


def test_mapping_prompt_logprobs_only(mapping):
    p = mapping["prefill_only"]
    assert p == dict(calls=1, max_tokens=1, seqs=[[]], plp=[None, -0.01, -0.02, -0.03, -0.04])


def test_mapping_adapters(mapping):
    assert mapping["lora_name"] == "loops-v1-1"
    assert "exceeds this engine's max_lora_rank 128" in mapping["big_adapter"]
