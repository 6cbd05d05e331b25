"""Many runs, one server: N runs training at once on one trainer + sampler pair, vs N single-run pairs.

"shared": one ServiceClient, N training clients on one base model — the local backend gives them one
trainer + sampler pair (the base model loaded once), a run each. "separate": N ServiceClients, each
with its own pair (the base model loaded N times). Both train the N runs concurrently (one thread
per run, ``forward_backward`` of ``batch`` x ``seq`` tokens then ``optim_step``, pipelined) and report
the total tokens/s, and the peak memory summed over the distinct server processes (peak RSS on CPU,
CUDA peak allocated on a GPU), with the ratio shared / separate. The number of trainer processes
each setup used is printed: a trainer whose engine holds one run gives every extra run a pair of its
own, and the table then says so.

    python bench/multirun.py                                   # CPU, tiny model, 4 runs, torch engine
    python bench/multirun.py --engine fake                     # the numpy engine in the same processes
    python bench/multirun.py --shape qwen3-0.6b --seq 512      # CUDA
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _shapes import fmt_bytes, model_path  # noqa: E402


def batch_of(batch: int, seq: int, vocab: int, seed: int) -> list:
    from loops_core import Datum, ModelInput, TensorData

    rng = random.Random(seed)
    data = []
    for _ in range(batch):
        toks = [rng.randrange(vocab) for _ in range(seq + 1)]
        data.append(Datum(model_input=ModelInput.from_ints(toks[:-1]),
                          loss_fn_inputs={"target_tokens": TensorData(data=toks[1:], dtype="int64", shape=[seq])}))
    return data


def train(clients: list, args: argparse.Namespace, steps: int) -> float:
    """All runs train ``steps`` steps at once; returns total tokens/s."""
    from loops_core import AdamParams

    adam = AdamParams(learning_rate=1e-4)

    vocab = min(len(clients[0].get_tokenizer()), 2048)  # before the threads: transformers' lazy imports race

    def one(i_tc) -> None:
        i, tc = i_tc
        data = batch_of(args.batch, args.seq, vocab, i)
        for _ in range(steps):
            fb, opt = tc.forward_backward(data), tc.optim_step(adam)
            fb.result()
            opt.result()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(one, enumerate(clients)))
    return len(clients) * steps * args.batch * args.seq / (time.perf_counter() - t0)


def peak_memory(clients: list) -> tuple[int, int, str]:
    """(bytes summed over the distinct trainer and sampler processes, trainer count, device)."""
    from loops_core.futures import run_sync
    from loops_core.wire import Endpoint, WireClient

    urls = {tc._endpoint.url for tc in clients} | {tc._sampler.url for tc in clients}
    total, device = 0, "cpu"
    for url in sorted(urls):
        wire = WireClient(Endpoint(url=url))
        stats = run_sync(wire.get_json("/stats", what="stats"))
        run_sync(wire.aclose())
        total += stats.get("cuda_peak_allocated_bytes", stats["peak_rss_bytes"])
        device = stats.get("cuda_device", device)
    return total, len({tc._endpoint.url for tc in clients}), device


def setup(kind: str, args: argparse.Namespace, path: str) -> dict:
    from loops_core import ServiceClient

    n = args.runs
    services = [ServiceClient(backend="local", engine=args.engine) for _ in range(1 if kind == "shared" else n)]
    clients = [services[0 if kind == "shared" else i].create_lora_training_client(path, rank=args.rank, seed=i)
               for i in range(n)]
    try:
        train(clients, args, args.warmup)
        rate = train(clients, args, args.steps)
        mem, trainers, device = peak_memory(clients)
    finally:
        for s in services:
            s.close()
    return {"rate": rate, "mem": mem, "trainers": trainers, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b"])
    parser.add_argument("--engine", default="local", choices=["local", "fake"])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    path = "loops/tiny-qwen3" if args.shape == "tiny" else model_path(args.shape)

    results = {kind: setup(kind, args, path) for kind in ("shared", "separate")}
    device = results["shared"]["device"]
    mem = "CUDA peak allocated" if device != "cpu" else "peak RSS"
    print(f"many runs, one server: {args.runs} runs of {args.shape} ({args.engine} engine), batch {args.batch} x "
          f"{args.seq} tokens, rank {args.rank}, {args.steps} steps each, device {device}")
    print(f"{'':<34} {'trainers':>8} {'tokens/s':>10} {mem + ' (servers)':>28}")
    for kind, label in (("shared", f"{args.runs} runs on one server"), ("separate", f"{args.runs} single-run servers")):
        r = results[kind]
        print(f"{label:<34} {r['trainers']:>8} {r['rate']:10,.0f} {fmt_bytes(r['mem']):>28}")
    s, p = results["shared"], results["separate"]
    print(f"ratio shared / separate: tokens/s {s['rate'] / p['rate']:.2f}x, memory {s['mem'] / p['mem']:.2f}x")


if __name__ == "__main__":
    main()
