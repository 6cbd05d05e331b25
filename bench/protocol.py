"""Protocol overhead: forward_backward round trips through the loops client vs bare httpx.

Both drive the same ``loops serve --engine fake`` process over loopback HTTP, doing the same
thing per round trip (``POST /forward_backward`` with one datum, then long-poll
``GET /operations/{id}`` until done). The bare client is the floor: a minimal httpx loop with no
validation, futures, ordering or retries. Measured sequentially and with 32 in flight.

    python bench/protocol.py [--n 300] [--inflight 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid

import httpx

from loops_core import ServiceClient
from loops_core.testing.contract.data import sft_datum


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--model", "bench", "--engine", "fake",
                             "--trainer-port", "0", "--sampler-port", "0", "--rank", "8"],
                            stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())["urls"]


def bare(url: str, body: dict, n: int, inflight: int) -> tuple[float, list[float]]:
    async def one(client: httpx.AsyncClient) -> float:
        t = time.perf_counter()
        r = await client.post("/forward_backward", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        op = r.json()["operation_id"]
        while True:
            p = await client.get(f"/operations/{op}")
            if p.status_code == 200:
                break
        return time.perf_counter() - t

    async def main() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await one(client)  # warm the connection
            lat: list[float] = []
            t0 = time.perf_counter()
            for i in range(0, n, inflight):
                lat += await asyncio.gather(*(one(client) for _ in range(min(inflight, n - i))))
            return n / (time.perf_counter() - t0), lat

    return asyncio.run(main())


def ours(tc, datum, n: int, inflight: int) -> tuple[float, list[float]]:
    tc.forward_backward([datum]).result()  # warm
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(0, n, inflight):
        batch = []
        for _ in range(min(inflight, n - i)):
            batch.append((time.perf_counter(), tc.forward_backward([datum])))
        for started, fut in batch:
            fut.result()
            lat.append(time.perf_counter() - started)
    return n / (time.perf_counter() - t0), lat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=32)
    args = parser.parse_args()
    proc, urls = start_server()
    try:
        service = ServiceClient.local(trainer_url=urls["trainer"], sampler_url=urls["sampler"])
        tc = service.create_lora_training_client("bench", rank=8)
        tok = tc.get_tokenizer()
        datum = sft_datum(tok.encode("What is the capital of France?\nAnswer:"), tok.encode(" Paris"))
        body = {"data": [datum.model_dump(mode="json")], "loss_fn": "cross_entropy", "loss_fn_config": None,
                "model": "bench"}
        rows = []
        for label, inflight in (("sequential", 1), (f"{args.inflight} in flight", args.inflight)):
            b_rate, b_lat = bare(urls["trainer"], body, args.n, inflight)
            o_rate, o_lat = ours(tc, datum, args.n, inflight)
            rows.append((label, b_rate, o_rate, b_lat, o_lat))
        service.close()
    finally:
        proc.terminate()
        proc.wait(10)

    print(f"forward_backward round trips over loopback HTTP, fake engine, n={args.n} per row")
    print(f"{'mode':<14} {'client':<12} {'rt/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, b_rate, o_rate, b_lat, o_lat in rows:
        for name, rate, lat in (("bare httpx", b_rate, b_lat), ("loops", o_rate, o_lat)):
            print(f"{label:<14} {name:<12} {rate:8.1f} {1e3 * percentile(lat, 50):8.2f} {1e3 * percentile(lat, 99):8.2f}")
        print(f"{label:<14} {'ratio':<12} {o_rate / b_rate:8.2f}x  (loops / bare; p50 "
              f"{statistics.median(o_lat) / statistics.median(b_lat):.2f}x)")


if __name__ == "__main__":
    main()
