"""Training throughput: a bare HF + peft loop vs the full loops stack, same model and batch.

The baseline runs in this process: ``get_peft_model`` with the same LoRA targets, AdamW, one
[batch, seq] forward with labels, backward, step; on CUDA with gradient checkpointing, like our
trainer's default there. Ours goes client → HTTP → trainer server
(a subprocess of the local backend) → engine: ``forward_backward`` of ``batch`` datums of
``seq`` tokens, then ``optim_step``, timed two ways: "waited" takes each call's result before
making the next, "pipelined" submits both and then waits (Tinker's advice: the optim step's
round trip overlaps the forward/backward). Every variant counts ``batch * seq`` tokens a step.

Both are set up once, then timed in alternating rounds and the median round reported, so that
a slow spell of the machine does not land on one side only.

    python bench/train_throughput.py                                     # CPU, tiny model, 8 x 128
    python bench/train_throughput.py --shape qwen3-0.6b --batch 8 --seq 1024   # CUDA
    python bench/train_throughput.py --shape qwen3-4b --batch 4 --seq 2048 --no-bare   # does it fit?

``--json PATH`` appends one JSON line with the figures (``bench/gpu_check.sh`` makes its table
from them).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _shapes import SHAPES, fmt_bytes, model_path  # noqa: E402


def timed(step, steps: int, tokens: int, sync=lambda: None) -> float:
    """Tokens per second over ``steps`` calls of ``step``."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return tokens * steps / (time.perf_counter() - t0)


def bare_step(path: str, batch: int, seq: int, rank: int, checkpointing: bool):
    """The baseline's step function, and a sync for timing it. ``checkpointing``: recompute the
    decoder layers in backward, as our trainer does by default on CUDA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loops_backends.local_gpu.lora import make_lora_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, make_lora_config(model, rank))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, min(vocab, 2048), (batch, seq), generator=g).to(device)

    def step() -> None:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, (torch.cuda.synchronize if cuda else lambda: None)


def our_steps(tc, batch: int, seq: int) -> dict:
    """``waited`` and ``pipelined`` step functions on the training client ``tc``."""
    from loops_core import AdamParams, Datum, ModelInput, TensorData

    rng = random.Random(0)
    data = []
    for _ in range(batch):
        toks = [rng.randrange(2048) for _ in range(seq + 1)]
        data.append(Datum(model_input=ModelInput.from_ints(toks[:-1]),
                          loss_fn_inputs={"target_tokens": TensorData(data=toks[1:], dtype="int64", shape=[seq])}))
    adam = AdamParams(learning_rate=1e-4)

    def waited() -> None:
        tc.forward_backward(data).result()
        tc.optim_step(adam).result()

    def pipelined() -> None:
        fb, opt = tc.forward_backward(data), tc.optim_step(adam)
        fb.result()
        opt.result()

    return {"loops, waited": waited, "loops, pipelined": pipelined}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="default 128 (tiny) / 1024 (qwen3-0.6b)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-bare", action="store_true", help="ours only (e.g. to see whether a shape fits)")
    parser.add_argument("--json", default=None, help="append the figures as one JSON line to this file")
    args = parser.parse_args()
    seq = args.seq or (128 if args.shape == "tiny" else 1024)
    path = model_path(args.shape)
    tokens = args.batch * seq

    import torch

    from loops_core import ServiceClient
    from loops_core.futures import run_sync
    from loops_core.wire import WireClient

    cuda = torch.cuda.is_available()
    with ServiceClient(backend="local") as service:
        tc = service.create_lora_training_client(path, rank=args.rank, seed=0)
        variants, sync = our_steps(tc, args.batch, seq), (torch.cuda.synchronize if cuda else lambda: None)
        if not args.no_bare:
            bare, sync = bare_step(path, args.batch, seq, args.rank, checkpointing=cuda)
            variants = {"bare HF + peft": bare, **variants}
        for step in variants.values():
            timed(step, args.warmup, tokens, sync)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in variants.items():
                rates[name].append(timed(step, args.steps, tokens, sync))
        stats = run_sync(WireClient(tc._endpoint).get_json("/stats", what="stats"))
    b_peak = None
    if not args.no_bare:
        b_peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    o_peak = stats.get("cuda_peak_allocated_bytes", stats["peak_rss_bytes"])
    device = stats.get("cuda_device", "cpu")

    mem = "CUDA peak allocated" if device != "cpu" else "peak RSS of the training process"
    print(f"training throughput: {args.shape}, batch {args.batch} x {seq} tokens, rank {args.rank}, "
          f"median of {args.rounds} rounds of {args.steps} steps, device {device}")
    print(f"{'':<28} {'tokens/s':>10} {'ratio':>7}")
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median.get("bare HF + peft")
    for name, rate in median.items():
        print(f"{name:<28} {rate:10,.0f} " + (f"{rate / base:6.2f}x" if base else "      -"))
    if b_peak:
        print(f"{mem}: bare {fmt_bytes(b_peak)}, loops {fmt_bytes(o_peak)}, ratio {o_peak / b_peak:.2f}x")
    else:
        print(f"{mem}: loops {fmt_bytes(o_peak)}")
    if args.json:
        row = {"bench": "train", "shape": args.shape, "batch": args.batch, "seq": seq, "device": device,
               "bare_tps": base, "loops_tps": median["loops, waited"],
               "loops_pipelined_tps": median["loops, pipelined"], "bare_peak_bytes": b_peak,
               "loops_peak_bytes": o_peak, "memory": mem}
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
