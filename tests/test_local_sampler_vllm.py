"""VLLMSamplerEngine on the tiny Qwen3 model: needs ``vllm`` and a CUDA GPU, else skipped.

vLLM runs the model in bfloat16 while the reference forwards run in float32, so logprobs are
compared with a loose tolerance and greedy tokens are checked to be (near-)argmax tokens of the
reference rather than identical to its greedy decode.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("vLLM tests need a CUDA GPU", allow_module_level=True)

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


def test_attributes(engine, ref):
    assert engine.vocab_size == ref.get_input_embeddings().weight.shape[0]
    assert engine.max_seq_len == 1024
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids


def test_greedy_and_logprobs(engine, tok, ref, run):
    p = tok.encode(PROMPTS[1])
    res = run(engine.generate(GenerationRequest(prompt=p, max_tokens=10, temperature=0.0,
                                                stop_at_eos=False)))
    (seq,) = res.sequences
    assert len(seq.tokens) == len(seq.logprobs) == 10 and seq.finish_reason == "length"
    _check_against(ref, p, seq, greedy=True)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_sampled_logprobs_are_temperature_scaled(engine, tok, ref, run, temperature):
    p = tok.encode(PROMPTS[0])
    res = run(engine.generate(GenerationRequest(prompt=p, n=2, max_tokens=8,
                                                temperature=temperature, seed=3,
                                                stop_at_eos=False)))
    for seq in res.sequences:
        _check_against(ref, p, seq, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
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


def test_compute_logprobs_with_max_tokens_zero(engine, tok, ref, run):
    p = tok.encode(PROMPTS[0])
    res = run(engine.generate(GenerationRequest(prompt=p, max_tokens=0, prompt_logprobs=0)))
    assert [s.tokens for s in res.sequences] == [[]]
    assert res.prompt_topk is None and res.prompt_logprobs[0] is None
    lp = torch.log_softmax(_logits(ref, p), dim=-1)
    want = torch.tensor([lp[i - 1, p[i]].item() for i in range(1, len(p))])
    assert torch.allclose(torch.tensor(res.prompt_logprobs[1:]), want, atol=TOL)


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


def test_factory_picks_vllm(monkeypatch):
    from loops_backends.local_gpu import samplers

    monkeypatch.delenv("LOOPS_SAMPLER_ENGINE", raising=False)
    assert samplers.vllm_available()
