"""TorchTrainerEngine (torch + peft) on the generated tiny Qwen3 model.

Losses, logprobs and LoRA gradients are checked against a float64 reference written out here:
a float64 copy of the engine's model run on each datum alone with full logits, and each loss
formula of ``loops_core.losses`` spelled out per datum.

CPU float32 by default. ``LOOPS_TRAINER_TEST_DEVICE=cuda`` (and optionally
``LOOPS_TRAINER_TEST_DTYPE=bfloat16``) runs the same checks on a GPU, with looser tolerances in
bfloat16 (where the bit-exact checks are skipped).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loops_core.losses import resolve_config  # noqa: E402
from loops_core.types import AdamParams, Datum, ModelInput  # noqa: E402

DEVICE = os.environ.get("LOOPS_TRAINER_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("LOOPS_TRAINER_TEST_DTYPE", "float32")
FP32 = DTYPE == "float32"
TOL = 1e-4 if FP32 else 0.25  # bfloat16 is a smoke test: RL ratios amplify its logprob error
CLOSE = 1e-5 if FP32 else 5e-2  # two float32 computations that differ only in summation order
RANK = 4
PARIS_RANK, PARIS_LR, PARIS_STEPS = 16, 5e-3, 30  # what the quickstart uses


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine their
    spin-waits make every small op slow; one thread keeps this file fast and steady."""
    before = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir():
    from loops_backends.local_gpu.tiny_model import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="module")
def engine(model_dir):
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    eng = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, seed=0, device=DEVICE, dtype=DTYPE)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def eng(engine):
    """The shared engine with a fresh adapter whose B is non-zero too (a fresh LoRA has B = 0,
    which would make every gradient of A zero and the checks weak)."""
    engine.init_lora(RANK, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in engine.named_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return engine


def grads(e) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in e.named_params}


def zero_grads(e) -> None:
    for p in e.params:
        p.grad.zero_()


def assert_same_grads(got: dict, want: dict, rtol=1e-4 if FP32 else 0.1):
    """Equal up to float32 summation order (packing and chunking change the order)."""
    for name, g in got.items():
        scale = float(want[name].abs().max())
        torch.testing.assert_close(g, want[name], rtol=rtol, atol=rtol * scale, msg=name)


def adapter(e) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in e.named_params}


def datum(tokens, **inputs) -> Datum:
    return Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def rand_tokens(g, n, vocab):
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def assert_lp(td, expected: torch.Tensor, tol=TOL):
    got = td.to_torch()
    assert td.dtype == "float32" and list(got.shape) == list(expected.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    torch.testing.assert_close(got[ok].double(), expected[ok].double(), rtol=tol, atol=tol)


def assert_grads_close(got: dict, ref: dict, tol=1e-3 if FP32 else 0.3):
    assert got.keys() == ref.keys()
    for name in got:
        r = ref[name].double().cpu()
        scale = float(r.abs().max())
        assert scale > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        torch.testing.assert_close(got[name].double().cpu(), r, rtol=tol, atol=tol * scale, msg=name)


# ---- the float64 reference ------------------------------------------------------------------


def reference_model(e):
    ref = copy.deepcopy(e.model).double()
    # Plain attention, one datum at a time (a varlen flash kernel would not run in float64).
    ref.get_base_model().set_attn_implementation("sdpa")
    for p in ref.parameters():
        p.grad = None
    return ref


def ref_logprobs(ref, d: Datum):
    """Full-logit float64 logprobs of one datum run alone: ([T, K] finite, [T, K] active, output)."""
    ids = torch.tensor([d.model_input.to_ints()], device=next(ref.parameters()).device)
    logp = ref(input_ids=ids).logits[0].double().log_softmax(-1)
    tgt = d.loss_fn_inputs["target_tokens"].to_torch().to(ids.device)
    t2 = tgt.reshape(ids.shape[1], -1)
    lp = logp.gather(-1, t2.clamp(min=0))
    active = t2 >= 0
    shown = torch.where(active, lp.detach(), math.nan).reshape(tgt.shape).cpu()
    return lp, active, shown


def reference_loss(ref, data: list[Datum], loss_fn: str, cfg: dict):
    """The loss table of loops_core.losses, written out per datum. Returns loss, metrics, lps."""
    total = torch.zeros((), dtype=torch.float64)
    ratios, clipped, n_tokens, s = [], [], 0, []
    shown = []
    for d in data:
        lp, active, out = ref_logprobs(ref, d)
        shown.append(out)
        dev = lp.device
        x = {k: v.to_torch().double().to(dev) for k, v in d.loss_fn_inputs.items() if k != "target_tokens"}
        w = x.get("weights", torch.ones(active.shape, dtype=torch.float64, device=dev)).reshape(active.shape)
        n_tokens += int(active.sum())  # active target entries
        if loss_fn == "cross_entropy":
            total = total + (-(w[active] * lp[active]).sum()).cpu()
            continue
        a = active[:, 0]
        lpa, wa = lp[:, 0][a], w[:, 0][a]
        if loss_fn == "dpo":
            s.append(((wa * lpa).sum() - (wa * x["ref_logprobs"][a]).sum()).cpu())
            continue
        q, adv = x["logprobs"][a], x["advantages"][a]
        r = torch.exp(lpa - q)
        ratios.append(r.detach().cpu())
        if loss_fn == "importance_sampling":
            term = r * adv
        elif loss_fn in ("ppo", "cispo"):
            lo = x["clip_low_threshold"][a] if "clip_low_threshold" in x else \
                torch.full_like(r, cfg["clip_low_threshold"])
            hi = x["clip_high_threshold"][a] if "clip_high_threshold" in x else \
                torch.full_like(r, cfg["clip_high_threshold"])
            rc = torch.minimum(torch.maximum(r, lo), hi)
            clipped.append(((r < lo) | (r > hi)).detach().cpu())
            term = torch.minimum(r * adv, rc * adv) if loss_fn == "ppo" else rc.detach() * adv * lpa
        elif loss_fn == "dro":
            term = adv * lpa - cfg["beta"] / 2 * (lpa - q) ** 2
        total = total + (-(wa * term).sum()).cpu()
    metrics = {"num_tokens:sum": n_tokens}
    if loss_fn == "dpo":
        beta, ls = cfg["beta"], cfg["label_smoothing"]
        m = torch.stack([beta * (s[i] - s[i + 1]) for i in range(0, len(s), 2)])
        total = -((1 - ls) * torch.nn.functional.logsigmoid(m) + ls * torch.nn.functional.logsigmoid(-m)).sum()
        metrics["accuracy:mean"] = float((m.detach() > 0).double().mean())
        metrics["margin:mean"] = float(m.detach().mean())
    if ratios:
        metrics["ratio:mean"] = float(torch.cat(ratios).mean())
    if clipped:
        metrics["clip_fraction:mean"] = float(torch.cat(clipped).double().mean())
    metrics["loss:sum"] = float(total.detach())
    return total, metrics, shown


# ---- test data --------------------------------------------------------------------------------


def make_data(e, loss_fn: str, seed: int = 0) -> list[Datum]:
    """Four datums with masked targets (-100), a zero weight on an active position, a datum
    without weights, NaN inputs at masked positions, per-token clip overrides on one datum, and
    sampler / reference logprobs near the current policy so that some ratios get clipped."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 9, 4, 7]
    data = []
    for i, n in enumerate(lengths):
        tokens = rand_tokens(g, n, e.vocab_size)
        target = torch.tensor(tokens[1:] + rand_tokens(g, 1, e.vocab_size))
        masked = torch.rand(n, generator=g) < 0.3
        masked[1] = False
        target[masked] = -100
        inputs = {"target_tokens": target.tolist()}
        if i != 1:
            w = torch.rand(n, generator=g) + 0.5
            if loss_fn == "cross_entropy":
                w[0] = -0.7  # signed weights are allowed for cross_entropy
            w[1] = 0.0  # active but weightless: logprob reported, no contribution
            inputs["weights"] = w.tolist()
        data.append((tokens, inputs, masked))
    out = []
    if loss_fn == "cross_entropy":
        return [datum(t, **x) for t, x, _ in data]
    # Sampler / reference logprobs: the current policy's plus noise, so r = exp(lp - q) spreads
    # around 1 (some outside [0.8, 1.2]).
    fwd = e.forward_backward([datum(t, target_tokens=x["target_tokens"]) for t, x, _ in data],
                             "cross_entropy", resolve_config("cross_entropy", {}), backward=False)
    for (tokens, x, masked), o in zip(data, fwd.loss_fn_outputs):
        lp = o["logprobs"].to_torch().double()
        noisy = lp + (torch.rand(lp.shape, generator=g, dtype=torch.float64) - 0.5) * 0.8
        noisy[masked] = math.nan  # must not leak into the loss or the gradient
        if loss_fn == "dpo":
            x["ref_logprobs"] = noisy.float().tolist()
        else:
            adv = torch.randn(lp.shape, generator=g)
            adv[masked] = math.nan
            x["logprobs"] = noisy.float().tolist()
            x["advantages"] = adv.tolist()
        out.append(datum(tokens, **x))
    if loss_fn in ("ppo", "cispo"):
        n = out[0].model_input.length
        out[0] = datum(out[0].model_input.to_ints(), **out[0].loss_fn_inputs,
                       clip_low_threshold=[0.95] * n, clip_high_threshold=[1.05] * n)
    return out


LOSS_CONFIGS = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", {}),
    ("dro", {"beta": 0.5}),
    ("dpo", {}),
    ("dpo", {"beta": 0.5, "label_smoothing": 0.2}),
]


# --------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic(tmp_path):
    from loops_backends.local_gpu.tiny_model import build_tiny_model

    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_model(a)
    build_tiny_model(b)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_model_loads_like_a_hub_model(model_dir, tok):
    from transformers import AutoModelForCausalLM

    from loops_backends.local_gpu.tiny_model import TINY_MODEL_NAME, resolve_model_path

    assert resolve_model_path(TINY_MODEL_NAME) == str(model_dir)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.architectures == ["Qwen3ForCausalLM"] and cfg.model_type == "qwen3"
    assert model.dtype == torch.float32
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert cfg.vocab_size == len(tok) == 2048
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    eos, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert cfg.eos_token_id == eos
    assert model.generation_config.eos_token_id == [eos, im_end]
    # Every row of the (tied) embedding is usable, eos included (no zeroed padding row).
    assert model.get_output_embeddings().weight.norm(dim=-1).min() > 0.5
    assert len(tok(" Paris").input_ids) == 1
    text = "What is the capital of France?\nAnswer: Paris"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tiny_model_path_is_cached_and_survives_a_race(tmp_path, monkeypatch):
    from loops_backends.local_gpu import tiny_model

    monkeypatch.setenv("LOOPS_HOME", str(tmp_path / "home"))
    final = tmp_path / "home" / "models" / tiny_model._DIR_NAME

    def build_and_lose_the_race(directory):
        (directory / "config.json").write_text("{}")
        final.mkdir(parents=True)  # another process finishes first
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(tiny_model, "build_tiny_model", build_and_lose_the_race)
    assert tiny_model.tiny_model_path() == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the loser's copy is gone

    monkeypatch.setattr(tiny_model, "build_tiny_model", lambda d: pytest.fail("rebuilt"))
    assert tiny_model.tiny_model_path() == final


def test_unknown_model_is_a_clear_error_offline(tmp_path, monkeypatch):
    from loops_backends.local_gpu.tiny_model import resolve_model_path
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # a local directory is itself
    with pytest.raises(ValueError, match="loops/tiny-qwen3") as info:
        TorchTrainerEngine("no-such-org/no-such-model-xyz", device="cpu")
    assert "could not be found locally or on the Hugging Face hub" in str(info.value)


# --------------------------------------------------------------------------------------------
# Engine attributes and the six losses against the float64 reference
# --------------------------------------------------------------------------------------------


def test_engine_attributes(engine, model_dir):
    assert engine.base_model == "loops/tiny-qwen3"
    assert engine.arch == "Qwen3ForCausalLM"
    assert engine.tokenizer_id == "loops/tiny-qwen3"  # named, so a client elsewhere resolves its own copy
    assert engine.vocab_size == 2048 and engine.max_seq_len == 2048
    assert engine.lora_rank == RANK
    assert all(".lora_" in n for n, _ in engine.named_params)
    assert not any(p.requires_grad for n, p in engine.model.named_parameters() if ".lora_" not in n)
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(engine.model.peft_config["default"].target_modules) == expected


@pytest.mark.parametrize("loss_fn,cfg", LOSS_CONFIGS, ids=[f"{n}{'-cfg' if c else ''}" for n, c in LOSS_CONFIGS])
def test_loss_logprobs_and_gradients_match_float64_reference(eng, loss_fn, cfg):
    data = make_data(eng, loss_fn)
    config = resolve_config(loss_fn, cfg)
    ref = reference_model(eng)
    ref_loss, ref_metrics, ref_lps = reference_loss(ref, data, loss_fn, config)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    zero_grads(eng)
    out = eng.forward_backward(data, loss_fn, config, backward=True)

    assert out.loss == pytest.approx(float(ref_loss.detach()), rel=TOL, abs=TOL)
    assert set(out.metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=TOL, abs=TOL), key
    assert len(out.loss_fn_outputs) == len(data)
    for o, lp in zip(out.loss_fn_outputs, ref_lps):
        assert_lp(o["logprobs"], lp)
    assert_grads_close(grads(eng), ref_grads)
    if loss_fn in ("ppo", "cispo"):
        assert 0 < out.metrics["clip_fraction:mean"] < 1  # the clip branch is exercised


def test_cross_entropy_with_k_targets_per_position(eng):
    g = torch.Generator().manual_seed(5)
    n, k = 6, 3
    tokens = rand_tokens(g, n, eng.vocab_size)
    target = torch.randint(3, eng.vocab_size, (n, k), generator=g)
    target[0, 2] = -100
    target[3] = -100  # a whole position masked
    weights = torch.randn(n, k, generator=g)  # signed
    data = [datum(tokens, target_tokens=target.tolist(), weights=weights.tolist()),
            datum(rand_tokens(g, 5, eng.vocab_size), target_tokens=rand_tokens(g, 5, eng.vocab_size))]
    config = resolve_config("cross_entropy", {})
    ref = reference_model(eng)
    ref_loss, ref_metrics, ref_lps = reference_loss(ref, data, "cross_entropy", config)
    ref_loss.backward()
    zero_grads(eng)
    out = eng.forward_backward(data, "cross_entropy", config, backward=True)
    assert out.loss == pytest.approx(float(ref_loss.detach()), rel=TOL, abs=TOL)
    assert out.metrics["num_tokens:sum"] == n * k - 1 - k + 5  # active (t, k) entries
    assert out.loss_fn_outputs[0]["logprobs"].shape == [n, k]
    assert out.loss_fn_outputs[1]["logprobs"].shape == [5]
    for o, lp in zip(out.loss_fn_outputs, ref_lps):
        assert_lp(o["logprobs"], lp)
    assert_grads_close(grads(eng), {n: p.grad for n, p in ref.named_parameters() if p.requires_grad})


def test_skip_token_normalization_is_echoed(eng):
    data = make_data(eng, "cross_entropy")
    plain = eng.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=False)
    echo = eng.forward_backward(data, "cross_entropy",
                                resolve_config("cross_entropy", {"skip_token_normalization": True}),
                                backward=False)
    assert "skip_token_normalization" not in plain.metrics
    assert echo.metrics["skip_token_normalization"] == 1.0
    assert echo.loss == plain.loss  # our losses are never normalised


# --------------------------------------------------------------------------------------------
# Packing, chunking, masking, accumulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_mask", [False, True], ids=["auto", "explicit-mask"])
def test_packed_equals_each_datum_alone(eng, explicit_mask, monkeypatch):
    monkeypatch.setattr(eng, "explicit_mask", explicit_mask)
    data = make_data(eng, "cross_entropy", seed=3)
    config = resolve_config("cross_entropy", {})
    packed = eng.forward_backward(data, "cross_entropy", config, backward=False)
    for d, o in zip(data, packed.loss_fn_outputs):
        alone = eng.forward_backward([d], "cross_entropy", config, backward=False)
        assert_lp(o["logprobs"], alone.loss_fn_outputs[0]["logprobs"].to_torch(), tol=CLOSE)


def _fake_varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch >= 2.11's varlen_attn, written with per-datum sdpa (the real one is CUDA-only)."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    outs = []
    for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (x[s:e].transpose(0, 1) for x in (query, key, value))  # [H, L, D]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                             enable_gqa=enable_gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _fake_varlen_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False,
                     return_aux=None, scale=None):
    """torch 2.9's signature: is_causal, no GQA."""
    assert is_causal and key.shape[1] == query.shape[1]
    return _fake_varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_fake_varlen_new, _fake_varlen_old], ids=["torch-2.11", "torch-2.9"])
def test_loops_varlen_attention_plumbing(eng, kernel, monkeypatch):
    """The CUDA varlen path (cu_seq_lens, no mask), with the kernel replaced by per-datum sdpa."""
    from loops_backends.local_gpu import trainer

    monkeypatch.setattr(trainer, "_varlen_kernel", lambda: kernel)
    var = trainer.TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, device=DEVICE, dtype=DTYPE,
                                     attn_implementation=trainer.VARLEN)
    assert var.varlen and not var.explicit_mask
    a, b = assert_same_step(var, eng, "cispo")
    for x, y in zip(b.loss_fn_outputs, a.loss_fn_outputs):
        assert_lp(x["logprobs"], y["logprobs"].to_torch(), tol=CLOSE)
    var.close()


def test_packing_uses_restarting_positions_without_padding(eng, monkeypatch):
    from loops_backends.local_gpu import trainer

    seen = {}
    real = trainer.pack

    def spy(*args, **kw):
        b = real(*args, **kw)
        seen["ids"], seen["pos"] = b.input_ids.cpu(), b.position_ids.cpu()
        return b

    monkeypatch.setattr(trainer, "pack", spy)
    data = [datum([5, 6, 7], target_tokens=[6, 7, 8]), datum([9, 10], target_tokens=[10, 11])]
    eng.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=False)
    assert seen["ids"].tolist() == [[5, 6, 7, 9, 10]]
    assert seen["pos"].tolist() == [[0, 1, 2, 0, 1]]


def test_chunked_logprobs_equal_full_logits():
    from loops_backends.local_gpu.trainer import target_logprobs

    g = torch.Generator().manual_seed(0)
    n, h, v, k = 37, 16, 50, 2
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False).double()
    targets = torch.randint(0, v, (n, k), generator=g)
    targets[::5, 0] = -100
    targets[7] = -1  # a row with nothing active is skipped
    for chunk in (1, 4, 1000):
        lp = target_logprobs(hidden, head, targets, chunk_tokens=chunk)
        (lp * torch.arange(n * k).reshape(n, k)).sum().backward()
        g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
        hidden.grad = head.weight.grad = None

        full = torch.log_softmax(head(hidden), -1).gather(-1, targets.clamp(min=0))
        full = torch.where(targets >= 0, full, 0.0)
        (full * torch.arange(n * k).reshape(n, k)).sum().backward()
        torch.testing.assert_close(lp, full)
        torch.testing.assert_close(g_h, hidden.grad)
        torch.testing.assert_close(g_w, head.weight.grad)
        hidden.grad = head.weight.grad = None


def test_logprob_chunks_are_checkpointed_only_when_there_are_several(monkeypatch):
    # One chunk's logits are alive at the start of backward whether kept or recomputed, so a
    # single chunk skips the checkpoint (and its second lm_head matmul); several keep it.
    from loops_backends.local_gpu import logprobs

    calls = []
    real = logprobs.checkpoint
    monkeypatch.setattr(logprobs, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hidden = torch.randn(10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False)
    targets = torch.randint(0, 20, (10, 1))
    logprobs.target_logprobs(hidden, head, targets, chunk_tokens=10).sum().backward()
    assert calls == []
    logprobs.target_logprobs(hidden, head, targets, chunk_tokens=4).sum().backward()
    assert len(calls) == 3


def test_chunk_size_and_micro_batches_do_not_change_results(eng, monkeypatch):
    for loss_fn in ("ppo", "dpo"):
        data = make_data(eng, loss_fn, seed=4)
        config = resolve_config(loss_fn, {})
        zero_grads(eng)
        base = eng.forward_backward(data, loss_fn, config, backward=True)
        g_base = grads(eng)
        monkeypatch.setattr(eng.config, "logprob_chunk_tokens", 3)
        monkeypatch.setattr(eng.config, "micro_batch_tokens", 8)  # several rows; dpo pairs kept whole
        zero_grads(eng)
        split = eng.forward_backward(data, loss_fn, config, backward=True)
        monkeypatch.undo()
        assert split.loss == pytest.approx(base.loss, rel=CLOSE, abs=CLOSE)
        for key in base.metrics:
            assert split.metrics[key] == pytest.approx(base.metrics[key], rel=CLOSE, abs=CLOSE), key
        for a, b in zip(split.loss_fn_outputs, base.loss_fn_outputs):
            assert_lp(a["logprobs"], b["logprobs"].to_torch(), tol=CLOSE)
        if FP32:  # in bfloat16 the different lm_head blocking moves single gradient entries a lot
            assert_same_grads(grads(eng), g_base)


def test_masked_positions_are_nan_and_contribute_nothing(eng):
    tokens = [11, 12, 13, 14]
    config = resolve_config("importance_sampling", {})
    masked = datum(tokens, target_tokens=[-100, -1, -100, -7], logprobs=[math.nan] * 4,
                   advantages=[math.nan] * 4)
    zero_grads(eng)
    out = eng.forward_backward([masked], "importance_sampling", config, backward=True)
    assert out.loss == 0.0 and out.metrics["num_tokens:sum"] == 0
    assert all(math.isnan(x) for x in out.loss_fn_outputs[0]["logprobs"].tolist())
    assert all(torch.count_nonzero(g) == 0 for g in grads(eng).values())
    # Weightless but active positions report their logprob and add nothing.
    w0 = datum(tokens, target_tokens=[12, 13, 14, 15], weights=[0.0] * 4)
    out = eng.forward_backward([w0], "cross_entropy", resolve_config("cross_entropy", {}), backward=True)
    assert out.loss == 0.0 and out.metrics["num_tokens:sum"] == 4
    assert all(x < 0 for x in out.loss_fn_outputs[0]["logprobs"].tolist())
    assert all(torch.count_nonzero(g) == 0 for g in grads(eng).values())


def test_forward_leaves_gradients_untouched(eng):
    data = make_data(eng, "cross_entropy")
    config = resolve_config("cross_entropy", {})
    zero_grads(eng)
    with_grad = eng.forward_backward(data, "cross_entropy", config, backward=True)
    before = grads(eng)
    assert any(torch.count_nonzero(g) for g in before.values())
    fwd = eng.forward_backward(data[:2], "cross_entropy", config, backward=False)
    after = grads(eng)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # bf16: a different batch packs differently, and rounds differently.
    assert fwd.loss_fn_outputs[0]["logprobs"].tolist() == pytest.approx(
        with_grad.loss_fn_outputs[0]["logprobs"].tolist(), rel=1e-6 if FP32 else CLOSE, nan_ok=True)


def test_gradients_accumulate_across_calls(eng):
    data = make_data(eng, "cross_entropy")
    config = resolve_config("cross_entropy", {})
    zero_grads(eng)
    a = eng.forward_backward(data[:2], "cross_entropy", config, backward=True)
    b = eng.forward_backward(data[2:], "cross_entropy", config, backward=True)
    separate = grads(eng)
    zero_grads(eng)
    both = eng.forward_backward(data, "cross_entropy", config, backward=True)
    assert both.loss == pytest.approx(a.loss + b.loss, rel=CLOSE)
    assert_same_grads(grads(eng), separate)


def test_max_seq_len_is_guarded(eng, monkeypatch):
    monkeypatch.setattr(eng, "max_seq_len", 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.forward_backward([datum([1, 2, 3, 4], target_tokens=[2, 3, 4, 5])], "cross_entropy",
                             resolve_config("cross_entropy", {}), backward=False)


# --------------------------------------------------------------------------------------------
# Optimizer, seeds, checkpoints, export
# --------------------------------------------------------------------------------------------


def _train(e, data, params: AdamParams, steps: int, start: int = 0) -> list[float]:
    """``steps`` steps, alternating between two halves of ``data`` (step ``i`` uses half i % 2)."""
    losses = []
    config = resolve_config("cross_entropy", {})
    for i in range(start, start + steps):
        losses.append(e.forward_backward(data[i % 2::2], "cross_entropy", config, backward=True).loss)
        e.optim_step(params)
    return losses


def test_every_adam_param_has_an_effect(eng):
    data = make_data(eng, "cross_entropy")[:2]
    start = adapter(eng)
    base = AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                      grad_clip_norm=0.0)

    def run(params):
        with torch.no_grad():
            for n, p in eng.named_params:
                p.copy_(start[n])
        eng._new_optimizer()
        for _ in range(2):  # Adam's first step is lr * sign-like whatever the betas: take two
            config = resolve_config("cross_entropy", {})
            eng.forward_backward(data, "cross_entropy", config, backward=True)
            metrics = eng.optim_step(params)
        return adapter(eng), metrics

    ref, metrics = run(base)
    assert metrics["learning_rate:mean"] == 1e-2 and metrics["grad_norm:mean"] > 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(eng).values())  # zeroed after the step
    for change in [dict(learning_rate=2e-2), dict(beta1=0.5), dict(beta2=0.5), dict(eps=1e-2),
                   dict(weight_decay=0.5), dict(grad_clip_norm=1e-3)]:
        got, m = run(base.model_copy(update=change))
        diff = max(float((got[n] - ref[n]).abs().max()) for n in ref)
        assert diff > 1e-6, f"{change} changed nothing"
    # Clipping: the reported norm is the pre-clip norm.
    eng._new_optimizer()
    eng.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=True)
    pre = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads(eng).values()))
    m = eng.optim_step(base.model_copy(update=dict(grad_clip_norm=1e-3)))
    assert m["grad_norm:mean"] == pytest.approx(pre, rel=1e-4)


def test_optim_step_counts_and_init_lora_resets(eng):
    data = make_data(eng, "cross_entropy")
    eng.init_lora(RANK, seed=3)
    assert eng.step == 0
    _train(eng, data, AdamParams(learning_rate=1e-3), 2)
    assert eng.step == 2 and len(eng.optimizer.state) > 0
    eng.init_lora(8, seed=3)
    assert eng.step == 0 and eng.lora_rank == 8 and len(eng.optimizer.state) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(eng).values())
    assert {tuple(p.shape) for n, p in eng.named_params if "lora_A" in n} >= {(8, 256)}
    # A fresh adapter leaves the model unchanged (B = 0).
    assert all(torch.count_nonzero(p) == 0 for n, p in eng.named_params if "lora_B" in n)


def test_seed_gives_bit_identical_adapters(engine):
    rng = torch.get_rng_state()
    engine.init_lora(RANK, seed=123)
    a = adapter(engine)
    engine.init_lora(RANK, seed=123)
    b = adapter(engine)
    engine.init_lora(RANK, seed=124)
    c = adapter(engine)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded init leaves the global RNG alone
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)
    engine.init_lora(RANK, seed=None)
    d = adapter(engine)
    engine.init_lora(RANK, seed=None)
    e = adapter(engine)
    assert any(not torch.equal(d[n], e[n]) for n in d if "lora_A" in n)  # unseeded: fresh each time


def test_resume_gives_the_same_losses(engine, tmp_path):
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    data = make_data(engine, "cross_entropy")
    params = AdamParams(learning_rate=2e-2, weight_decay=0.01, grad_clip_norm=1.0)
    engine.init_lora(RANK, seed=7)
    straight = _train(engine, data, params, 6)

    engine.init_lora(RANK, seed=7)
    first = _train(engine, data, params, 3)
    engine.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=True)
    engine.save_state(tmp_path)  # pending gradients are not saved
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 3

    fresh = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=8, seed=99, device=DEVICE, dtype=DTYPE)
    fresh.load_state(tmp_path, with_optimizer=True)
    assert fresh.step == 3 and fresh.lora_rank == RANK
    assert all(torch.count_nonzero(g) == 0 for g in grads(fresh).values())
    resumed = first + _train(fresh, data, params, 3, start=3)
    tol = 1e-6 if FP32 and DEVICE == "cpu" else 1e-3
    assert resumed == pytest.approx(straight, rel=tol, abs=tol)

    # Without the optimizer state Adam starts over (the step count is kept): a different path.
    fresh.load_state(tmp_path, with_optimizer=False)
    assert fresh.step == 3 and len(fresh.optimizer.state) == 0
    assert first + _train(fresh, data, params, 3, start=3) != pytest.approx(straight, rel=1e-6)
    fresh.close()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5
def test_exported_adapter_loads_in_peft_with_the_same_logits(eng, model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = make_data(eng, "cross_entropy")
    _train(eng, data, AdamParams(learning_rate=1e-2), 2)
    eng.export_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "loops/tiny-qwen3"
    assert cfg["r"] == RANK and cfg["peft_type"] == "LORA"
    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default." not in k for k in keys)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE)).to(DEVICE)
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ids = torch.tensor([data[0].model_input.to_ints() + data[1].model_input.to_ints()], device=DEVICE)
    with torch.no_grad():
        want = eng.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            without = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert (without - want).abs().max() > 1e-2  # the adapter matters


def test_gradient_checkpointing_gives_the_same_gradients(eng):
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    ckpt = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, device=DEVICE, dtype=DTYPE,
                              gradient_checkpointing=True)
    assert_same_step(ckpt, eng, "ppo")
    ckpt.close()


def test_learns_paris(engine, tok):
    """The quickstart: PARIS_STEPS steps at PARIS_LR teach the random model " Paris" + eos."""
    prompt = tok("What is the capital of France?\nAnswer:").input_ids
    completion = tok(" Paris").input_ids + [tok.eos_token_id]
    tokens = prompt + completion
    target = [-100] * (len(prompt) - 1) + completion + [-100]
    d = datum(tokens, target_tokens=target)
    config = resolve_config("cross_entropy", {})
    engine.init_lora(PARIS_RANK, seed=0)
    t0 = time.perf_counter()
    first = engine.forward_backward([d], "cross_entropy", config, backward=False).loss
    for _ in range(PARIS_STEPS):
        engine.forward_backward([d], "cross_entropy", config, backward=True)
        engine.optim_step(AdamParams(learning_rate=PARIS_LR))
    elapsed = time.perf_counter() - t0
    last = engine.forward_backward([d], "cross_entropy", config, backward=False)
    assert first > 10  # two tokens, ~ln(2048) each or worse
    assert last.loss < 0.05, last.loss
    assert all(lp > -0.05 for lp in last.loss_fn_outputs[0]["logprobs"].tolist() if not math.isnan(lp))
    assert elapsed < 30


def test_equal_length_datums_run_as_a_batch_with_the_same_results(eng, monkeypatch):
    """Equal lengths take the [B, L] path (no block mask, no padding); values and gradients must
    equal those of each datum run alone."""
    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(3):
        ids = torch.randint(3, 2048, (9,), generator=g).tolist()
        data.append(datum(ids[:-1], target_tokens=ids[1:]))
    config = resolve_config("cross_entropy", {})
    shapes = []
    real = eng.decoder.forward

    def spy(*a, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return real(*a, **kw)

    monkeypatch.setattr(eng.decoder, "forward", spy)
    zero_grads(eng)
    batched = eng.forward_backward(data, "cross_entropy", config, backward=True)
    together = grads(eng)
    assert shapes[-1] == (3, 8), shapes
    zero_grads(eng)
    for d, out in zip(data, batched.loss_fn_outputs):
        alone = eng.forward_backward([d], "cross_entropy", config, backward=True)
        assert_lp(out["logprobs"], alone.loss_fn_outputs[0]["logprobs"].to_torch(), tol=CLOSE)
    assert_same_grads(together, grads(eng))
    uneven = [data[0], datum(data[1].model_input.to_ints()[:-1],
                             target_tokens=data[1].loss_fn_inputs["target_tokens"].data[:-1])]
    eng.forward_backward(uneven, "cross_entropy", config, backward=False)
    assert shapes[-1] == (1, 15), "unequal lengths are packed into one row"


def copy_params(dst, src):
    """Give ``dst`` the same LoRA weights as ``src`` (engines built with other options)."""
    with torch.no_grad():
        for (_, p), (_, q) in zip(dst.named_params, src.named_params, strict=True):
            p.copy_(q)


def assert_same_step(variant, eng, loss_fn: str):
    """``variant`` (an engine built with other options) gives ``eng``'s loss and gradients for
    the same weights and data; returns both outputs (``eng``'s first)."""
    copy_params(variant, eng)
    data = make_data(eng, loss_fn)
    config = resolve_config(loss_fn, {})
    zero_grads(eng)
    a = eng.forward_backward(data, loss_fn, config, backward=True)
    b = variant.forward_backward(data, loss_fn, config, backward=True)
    assert b.loss == pytest.approx(a.loss, rel=CLOSE)
    assert_same_grads(grads(variant), grads(eng))
    return a, b


# --------------------------------------------------------------------------------------------
# Many runs on one base, the resident cap, top-k logprobs, non-finite guard, bf16 LoRA compute
# --------------------------------------------------------------------------------------------


def _run_script(e, data, steps=3):
    """Losses, logprobs and weights of a few steps on the current run."""
    config = resolve_config("cross_entropy", {})
    params = AdamParams(learning_rate=2e-2, weight_decay=0.01, grad_clip_norm=1.0)
    out = []
    for i in range(steps):
        fb = e.forward_backward(data[i % 2::2], "cross_entropy", config, backward=True)
        out.append((fb.loss, [o["logprobs"].to_torch() for o in fb.loss_fn_outputs]))
        e.optim_step(params)
    return out, adapter(e)


def _assert_bit_identical(a, b):
    (steps_a, weights_a), (steps_b, weights_b) = a, b
    for (la, lpa), (lb, lpb) in zip(steps_a, steps_b):
        assert la == lb
        assert all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(lpa, lpb))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)


@pytest.mark.parametrize("cap", [None, 1])
def test_runs_interleaved_equal_each_run_alone_on_a_fresh_trainer(engine, cap, tmp_path):
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    if not FP32 and DEVICE != "cpu":
        pytest.skip("bit-identity is checked in float32")
    data = make_data(engine, "cross_entropy")
    alone = {}
    for name, rank, seed in [("a", 8, 3), ("b", RANK, 7)]:
        solo = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=rank, seed=seed, device=DEVICE, dtype=DTYPE)
        alone[name] = _run_script(solo, data)
        solo.close()

    multi = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, seed=0, device=DEVICE, dtype=DTYPE,
                               max_resident_runs=cap)
    multi.init_lora(8, seed=3, run="a")
    multi.init_lora(RANK, seed=7, run="b")
    assert multi.runs == ["default", "a", "b"] and multi.lora_rank == RANK
    if cap == 1:
        assert multi.resident_runs == ["b"]  # the others wait off the device
    # Interleave the two runs step by step, with a third run (default) training in between.
    got = {"a": ([], None), "b": ([], None)}
    config = resolve_config("cross_entropy", {})
    params = AdamParams(learning_rate=2e-2, weight_decay=0.01, grad_clip_norm=1.0)
    for i in range(3):
        for name in ("a", "b"):
            multi.use_run(name)
            fb = multi.forward_backward(data[i % 2::2], "cross_entropy", config, backward=True)
            got[name][0].append((fb.loss, [o["logprobs"].to_torch() for o in fb.loss_fn_outputs]))
            multi.optim_step(params)
            if cap == 1:
                assert multi.resident_runs == [name]
            multi.use_run("default")
            multi.forward_backward(data, "cross_entropy", config, backward=True)
            multi.optim_step(AdamParams(learning_rate=0.1))
    for name in ("a", "b"):
        multi.use_run(name)
        assert multi.step == 3
        _assert_bit_identical((got[name][0], adapter(multi)), alone[name])
    # A non-default run exports as a standard PEFT directory, like the default run.
    multi.use_run("a")
    multi.export_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".r1." not in k for k in keys)
    # Resetting one run leaves the others; closing frees; unknown runs are refused.
    before_b = (multi.use_run("b"), adapter(multi))[1]
    multi.init_lora(8, seed=3, run="a")
    assert multi.step == 0 and multi.lora_rank == 8
    multi.use_run("b")
    assert multi.step == 3 and all(torch.equal(before_b[n], p) for n, p in adapter(multi).items())
    multi.close_run("a")
    assert multi.runs == ["default", "b"]
    with pytest.raises(LookupError, match="unknown run 'a'"):
        multi.use_run("a")
    multi.close_run("nope")  # ignored
    # Closing every run leaves the bare base model; a new run then starts as on a fresh engine.
    multi.close_run("b")
    multi.close_run("default")
    assert multi.runs == [] and multi.model is None
    with pytest.raises(LookupError, match="no current run"):
        multi.step  # noqa: B018
    multi.init_lora(8, seed=3, run="c")
    _assert_bit_identical(_run_script(multi, data), alone["a"])
    multi.close()


def test_offload_and_restore_are_bit_exact_and_move_every_tensor(engine):
    from loops_backends.local_gpu.trainer_runs import offload, restore

    data = make_data(engine, "cross_entropy")
    engine.init_lora(RANK, seed=5)
    _train(engine, data, AdamParams(learning_rate=1e-2), 2)
    engine.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=True)
    run = engine.current
    snap = [(p.detach().clone(), p.grad.clone(), {k: v.clone() for k, v in engine.optimizer.state[p].items()})
            for p in run.params]
    ptrs = [p.data_ptr() for p in run.params]
    offload(run, torch.device("cpu"))
    assert not run.resident and all(p.device.type == "cpu" for p in run.params)
    assert all(p.data_ptr() != q for p, q in zip(run.params, ptrs))  # new buffers, really moved
    restore(run, engine.device)
    assert run.resident
    for p, (w, g, st) in zip(run.params, snap):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
        state = engine.optimizer.state[p]
        assert all(torch.equal(state[k], v) and state[k].device == v.device for k, v in st.items())


def test_top_k_logprobs_match_the_full_distribution(eng):
    data = make_data(eng, "cross_entropy")[:2]
    config = resolve_config("cross_entropy", {})
    plain = eng.forward_backward(data, "cross_entropy", config, backward=False)
    fb = eng.forward_backward(data, "cross_entropy", config, backward=False, top_k_logprobs=5)
    for d, o, p in zip(data, fb.loss_fn_outputs, plain.loss_fn_outputs):
        ids, vals = o["topk_token_ids"].to_torch(), o["topk_logprobs"].to_torch()
        n = d.model_input.length
        assert o["topk_token_ids"].dtype == "int64" and o["topk_logprobs"].dtype == "float32"
        assert ids.shape == (n, 5) and vals.shape == (n, 5)
        assert torch.all(vals[:, :-1] >= vals[:, 1:])  # best first
        with torch.no_grad():
            x = torch.tensor([d.model_input.to_ints()], device=eng.device)
            full = torch.log_softmax(eng.model(input_ids=x).logits[0].double(), -1).cpu()
        want_vals, _ = full.topk(5, -1)
        torch.testing.assert_close(vals.double(), want_vals, rtol=TOL, atol=TOL)
        torch.testing.assert_close(full.gather(-1, ids), want_vals, rtol=TOL, atol=TOL)
        # Asking for top-k changes nothing else.
        assert torch.equal(o["logprobs"].to_torch().nan_to_num(), p["logprobs"].to_torch().nan_to_num())
    with pytest.raises(ValueError, match="top_k_logprobs"):
        eng.forward_backward(data, "cross_entropy", config, backward=False, top_k_logprobs=21)


@pytest.mark.parametrize("backward", [True, False])
def test_non_finite_loss_fails_and_changes_nothing(eng, backward):
    from loops_backends.local_gpu.trainer import NonFiniteError

    data = make_data(eng, "cross_entropy")
    config = resolve_config("cross_entropy", {})
    eng.forward_backward(data[:2], "cross_entropy", config, backward=True)  # something accumulated
    before_grads, before_weights = grads(eng), adapter(eng)
    before_opt = {id(p): {k: v.clone() for k, v in eng.optimizer.state.get(p, {}).items()} for p in eng.params}
    tokens = data[0].model_input.to_ints()
    bad = datum(tokens, target_tokens=tokens[1:] + [3], weights=[1.0, float("inf")] + [1.0] * (len(tokens) - 2))
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        eng.forward_backward([data[2], bad], "cross_entropy", config, backward=backward)
    assert all(torch.equal(before_grads[n], g) for n, g in grads(eng).items())
    assert all(torch.equal(before_weights[n], w) for n, w in adapter(eng).items())
    assert all(torch.equal(before_opt[id(p)][k], v) for p in eng.params
               for k, v in eng.optimizer.state.get(p, {}).items())
    # The engine goes on working, and accumulates onto the same gradient.
    eng.forward_backward(data[2:], "cross_entropy", config, backward=True)
    assert eng.optim_step(AdamParams(learning_rate=1e-3))["grad_norm:mean"] > 0


BF16_LOSS_RTOL, BF16_LP_ATOL = 2e-2, 6e-2  # bf16 LoRA matmuls vs fp32 ones, both on a bf16 base


def test_bf16_lora_compute_agrees_with_fp32_lora_and_keeps_fp32_master_weights(model_dir):
    """The CUDA default (bf16 base, LoRA matmuls in bf16 under autocast, fp32 master weights and
    Adam state) against the old path (peft's fp32 LoRA matmuls on the same bf16 base), on the CPU
    (or on the GPU with LOOPS_TRAINER_TEST_DEVICE=cuda, as bench/gpu_check.sh runs it)."""
    from loops_backends.local_gpu.trainer import TorchTrainerEngine

    results = {}
    for compute in ("float32", None):
        e = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, seed=0, device=DEVICE, dtype="bfloat16",
                               lora_compute_dtype=compute)
        assert (e._autocast_dtype is None) == (compute == "float32")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in e.named_params:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device))
        data = make_data(e, "cross_entropy")
        fb = e.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=True)
        e.optim_step(AdamParams(learning_rate=1e-2))
        assert all(p.dtype == torch.float32 for p in e.params)
        assert all(v.dtype == torch.float32 for p in e.params for k, v in e.optimizer.state[p].items()
                   if k != "step")
        results[compute] = (fb.loss, [o["logprobs"].to_torch() for o in fb.loss_fn_outputs])
        e.close()
    (l32, lp32), (l16, lp16) = results["float32"], results[None]
    assert l16 == pytest.approx(l32, rel=BF16_LOSS_RTOL)
    for a, b in zip(lp32, lp16):
        torch.testing.assert_close(b, a, atol=BF16_LP_ATOL, rtol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's fused cross-entropy needs CUDA")
def test_liger_fused_logprobs_agree_with_the_plain_path(model_dir):
    from loops_backends.local_gpu.trainer import TorchTrainerEngine, fused_ce_available

    if not fused_ce_available():
        pytest.skip("liger-kernel is not installed")
    outs = {}
    for mode in ("off", "auto"):
        e = TorchTrainerEngine("loops/tiny-qwen3", lora_rank=RANK, seed=0, device="cuda", fused_ce=mode)
        assert e._fused_ce == (mode == "auto")
        data = make_data(e, "cross_entropy")
        fb = e.forward_backward(data, "cross_entropy", resolve_config("cross_entropy", {}), backward=False)
        outs[mode] = [o["logprobs"].to_torch() for o in fb.loss_fn_outputs]
        e.close()
    for a, b in zip(outs["off"], outs["auto"]):
        torch.testing.assert_close(b, a, atol=5e-2, rtol=0, equal_nan=True)
