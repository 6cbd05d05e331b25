"""Sampling throughput: bare HF ``generate`` with the adapter attached vs the loops stack.

Both sample ``--new`` tokens after a ``--prompt``-token prompt with EOS disabled, at batch 1 and
64. The baseline is ``PeftModel.generate`` on a [batch, prompt] tensor in this process. Ours
publishes the same adapter through a trainer, then sends ``batch`` concurrent ``sample`` calls to
the sampler server (the HF engine batches concurrent requests; vLLM where it is installed).
Both are set up once, warmed up, then timed in alternating rounds; the median round is reported.

    python bench/sample_throughput.py                        # CPU, tiny model
    python bench/sample_throughput.py --shape qwen3-0.6b     # CUDA
    python bench/sample_throughput.py --shape qwen3-0.6b --sampler-engine hf   # the HF engine

``--json PATH`` appends one JSON line per batch size (``bench/gpu_check.sh`` makes its table
from them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _shapes import SHAPES, model_path  # noqa: E402


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 2048) for _ in range(length)] for _ in range(batch)]


def bare_generate(path: str, adapter_dir: str, prompt_len: int, new: int):
    """``run(batch) -> tokens/s`` with ``PeftModel.generate`` in this process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = PeftModel.from_pretrained(base.to("cuda" if cuda else "cpu"), adapter_dir).eval()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=0)

    def run(b: int) -> float:
        x = torch.tensor(prompts(b, prompt_len), device=model.device)
        with torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            if cuda:
                torch.cuda.synchronize()
        return b * new / (time.perf_counter() - t0)

    return run


def our_sampling(sc, prompt_len: int, new: int):
    """``run(batch) -> tokens/s``: ``batch`` concurrent ``sample`` calls through the sampler server."""
    from loops_core import ModelInput, SamplingParams

    params = SamplingParams(max_tokens=new, temperature=1.0, stop=[])  # stop=[]: EOS disabled too

    async def burst(b: int) -> float:
        ps = prompts(b, prompt_len)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(sc.sample_async(ModelInput.from_ints(p), 1, params) for p in ps))
        elapsed = time.perf_counter() - t0
        assert all(len(r.sequences[0].tokens) == new for r in results)
        return b * new / elapsed

    return lambda b: asyncio.run(burst(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 32 tiny / 128)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampler-engine", default=None, choices=["auto", "hf", "vllm"],
                        help="the local sampler engine (default: LOOPS_SAMPLER_ENGINE, else auto)")
    parser.add_argument("--json", default=None, help="append the figures as JSON lines to this file")
    args = parser.parse_args()
    if args.sampler_engine:
        os.environ["LOOPS_SAMPLER_ENGINE"] = args.sampler_engine  # read when the sampler starts
    new = args.new or (32 if args.shape == "tiny" else 128)
    batches = [int(b) for b in args.batches.split(",")]
    path = model_path(args.shape)

    from loops_core import ServiceClient
    from loops_core.checkpoints import CheckpointStore

    rates: dict[tuple[str, int], list[float]] = {}
    with ServiceClient(backend="local") as service:
        tc = service.create_lora_training_client(path, rank=args.rank, seed=0)
        sc = tc.save_weights_and_get_sampling_client("bench").result()
        adapter_dir = str(CheckpointStore().resolve(sc.checkpoint_path))
        variants = {"bare": bare_generate(path, adapter_dir, args.prompt, new),
                    "loops": our_sampling(sc, args.prompt, new)}
        for b in batches:
            for run in variants.values():
                run(b)  # warm-up: kernels, allocator, connections
            for _ in range(args.rounds):
                for name, run in variants.items():
                    rates.setdefault((name, b), []).append(run(b))

    print(f"sampling throughput: {args.shape}, prompt {args.prompt} tokens, {new} new tokens, LoRA rank {args.rank}, "
          f"median of {args.rounds} rounds")
    print(f"{'batch':>5} {'bare generate tok/s':>20} {'loops tok/s':>12} {'ratio':>7}")
    for b in batches:
        theirs, mine = statistics.median(rates["bare", b]), statistics.median(rates["loops", b])
        print(f"{b:>5} {theirs:20,.1f} {mine:12,.1f} {mine / theirs:6.2f}x")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"bench": "sample", "shape": args.shape, "batch": b, "new": new,
                                    "engine": os.environ.get("LOOPS_SAMPLER_ENGINE", "auto"),
                                    "bare_tps": theirs, "loops_tps": mine}) + "\n")


if __name__ == "__main__":
    main()
