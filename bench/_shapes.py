"""Models the benchmarks run: the built-in tiny model, or random-initialised Qwen3 shapes.

``qwen3-0.6b`` has Qwen3-0.6B's architecture (28 layers, hidden 1024, 16/8 heads, vocab 151936)
with random weights, written once under ``$LOOPS_HOME/models/`` in bf16, with the tiny model's
tokenizer beside it: nothing is downloaded, and throughput does not depend on the weights.
``qwen3-1.7b`` and ``qwen3-4b`` likewise (their published configs' sizes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loops_backends.local_gpu.tiny_model import loops_home, tiny_model_path

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


QWEN3_1_7B = {**QWEN3_0_6B, "hidden_size": 2048, "intermediate_size": 6144}
QWEN3_4B = {**QWEN3_0_6B, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32}
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "qwen3-1.7b": QWEN3_1_7B, "qwen3-4b": QWEN3_4B}


def model_path(shape: str) -> str:
    if shape == "tiny":
        return str(tiny_model_path())
    if shape not in SHAPES:
        raise SystemExit(f"unknown --shape {shape!r}: use tiny or one of {sorted(SHAPES)}")
    out = loops_home() / "models" / f"bench-{shape}-random"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    config = Qwen3Config(**SHAPES[shape], torch_dtype="bfloat16", architectures=["Qwen3ForCausalLM"])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in Path(tiny_model_path()).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return str(out)


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"
