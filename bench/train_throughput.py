"""Training throughput: a bare HF + peft loop vs the full loops stack, same model and batch.

The baseline runs in this process: ``get_peft_model`` with the same LoRA targets, AdamW, one
[batch, seq] forward with labels, backward, step. Ours goes client → HTTP → trainer server
(a subprocess of the local backend) → engine: ``forward_backward`` of ``batch`` datums of
``seq`` tokens, then ``optim_step``. Both count ``batch * seq`` tokens a step.

    python bench/train_throughput.py                                     # CPU, tiny model, 8 x 128
    python bench/train_throughput.py --shape qwen3-0.6b --batch 8 --seq 1024   # CUDA
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _shapes import fmt_bytes, model_path  # noqa: E402


def baseline(path: str, batch: int, seq: int, steps: int, rank: int, warmup: int) -> tuple[float, float]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from loops_backends.local_gpu.lora import make_lora_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    model = get_peft_model(model, make_lora_config(model, rank))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, min(vocab, 2048), (batch, seq), generator=g).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    rate = batch * seq * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rate, peak


def ours(path: str, batch: int, seq: int, steps: int, rank: int, warmup: int) -> tuple[float, float, str]:
    import random

    from loops_core import AdamParams, Datum, ModelInput, ServiceClient, TensorData
    from loops_core.wire import WireClient
    from loops_core.futures import run_sync

    rng = random.Random(0)
    with ServiceClient(backend="local") as service:
        tc = service.create_lora_training_client(path, rank=rank, seed=0)
        data = []
        for _ in range(batch):
            toks = [rng.randrange(2048) for _ in range(seq + 1)]
            data.append(Datum(model_input=ModelInput.from_ints(toks[:-1]),
                              loss_fn_inputs={"target_tokens": TensorData(data=toks[1:], dtype="int64", shape=[seq])}))
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            tc.forward_backward(data).result()
            tc.optim_step(AdamParams(learning_rate=1e-4)).result()
        rate = batch * seq * steps / (time.perf_counter() - t0)
        stats = run_sync(WireClient(tc._endpoint).get_json("/stats", what="stats"))
    peak = stats.get("cuda_peak_allocated_bytes", stats["peak_rss_bytes"])
    return rate, peak, stats.get("cuda_device", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="default 128 (tiny) / 1024 (qwen3-0.6b)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    seq = args.seq or (128 if args.shape == "tiny" else 1024)
    path = model_path(args.shape)
    b_rate, b_peak = baseline(path, args.batch, seq, args.steps, args.rank, args.warmup)
    o_rate, o_peak, device = ours(path, args.batch, seq, args.steps, args.rank, args.warmup)
    mem = "CUDA peak allocated" if device != "cpu" else "peak RSS of the training process"
    print(f"training throughput: {args.shape}, batch {args.batch} x {seq} tokens, rank {args.rank}, "
          f"{args.steps} timed steps, device {device}")
    print(f"{'':<22} {'tokens/s':>10} {mem:>34}")
    print(f"{'bare HF + peft':<22} {b_rate:10,.0f} {fmt_bytes(b_peak):>34}")
    print(f"{'loops (client+HTTP)':<22} {o_rate:10,.0f} {fmt_bytes(o_peak):>34}")
    print(f"{'ratio (loops / bare)':<22} {o_rate / b_rate:10.2f}x {o_peak / b_peak:33.2f}x")


if __name__ == "__main__":
    main()
