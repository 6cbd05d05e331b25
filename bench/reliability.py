"""Reliability measurements against ``loops serve --engine fake`` on loopback (issue #14).

    python bench/reliability.py sigterm            what SIGTERM does to running, queued and new operations
    python bench/reliability.py load               256 concurrent samples + 16 training clients: lost /
                                                   duplicated / wrong / errors, p50 / p99
    python bench/reliability.py rss [--ops 10000]  server RSS after N forward operations (result store capped)
    python bench/reliability.py fuzz [--n 5000]    the property-based fuzz (tests/test_fuzz.py) with N requests
                                                   per server; prints 2xx / 4xx / 5xx / slow / state unchanged

Every command starts its own server process and stops it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx


def start_server(**env: str) -> tuple[subprocess.Popen, dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--model", "bench", "--engine", "fake",
                             "--trainer-port", "0", "--sampler-port", "0", "--rank", "8", "--log-level", "warning"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    return proc, json.loads(proc.stdout.readline())["urls"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def datum(n: int, salt: int = 0) -> dict:
    tokens = [1 + (i * 7 + salt) % 200 for i in range(n)]
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:] + [0], "dtype": "int64", "shape": [n]}}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def result(c: httpx.AsyncClient, op: str) -> httpx.Response:
    while (r := await c.get(f"/operations/{op}")).status_code == 408:
        pass
    return r


# ---- SIGTERM ------------------------------------------------------------------------------------
def sigterm(args: argparse.Namespace) -> None:
    proc, urls = start_server(LOOPS_DRAIN_S="5")
    big = {"data": [datum(2000, s) for s in range(16)]}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=urls["trainer"], timeout=60) as c:
            await result(c, (await c.post("/init_trainer_server", json={"lora_rank": 8})).json()["operation_id"])
            t0 = time.monotonic()
            await result(c, (await c.post("/forward_backward", json=big)).json()["operation_id"])
            one = time.monotonic() - t0
            ops = [(await c.post("/forward_backward", json=big)).json()["operation_id"] for _ in range(4)]
            await asyncio.sleep(0.05)
            t_sig = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.08)
            new = await c.post("/forward_backward", json=big)
            outcomes = []
            for op in ops:
                r = await result(c, op)
                outcomes.append(f"{r.status_code} {r.json().get('status')}/{r.json().get('error_class') or '-'}")
            exit_code = await asyncio.to_thread(proc.wait, 60)
            print(f"one forward_backward takes {one:.2f}s; 1 running + 3 queued when SIGTERM arrived")
            print(f"new submit 0.08 s after SIGTERM: {new.status_code} {new.json()['details']['reason']}")
            print(f"running op: {outcomes[0]}")
            for i, o in enumerate(outcomes[1:], 1):
                print(f"queued op {i}: {o}")
            print(f"process exited with code {exit_code} {time.monotonic() - t_sig:.2f}s after SIGTERM "
                  "(drain: LOOPS_DRAIN_S=5, ended once every owed result was polled)")

    try:
        asyncio.run(main())
    finally:
        stop(proc)


# ---- load ---------------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> None:
    proc, urls = start_server()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=urls["trainer"], timeout=300, limits=limits) as t, \
                httpx.AsyncClient(base_url=urls["sampler"], timeout=300, limits=limits) as s:
            await result(t, (await t.post("/init_trainer_server", json={"lora_rank": 8, "seed": 0})).json()["operation_id"])

            async def sample(i: int) -> tuple[float, list, str, int]:
                t0 = time.monotonic()
                r = await s.post("/sample", json={"prompt": [1 + i % 50, 2, 3], "n": 2, "max_tokens": 16, "seed": i})
                ids = [c["sequence_id"] for c in r.json()["choices"]] if r.status_code == 200 else []
                toks = [c["token_ids"] for c in r.json()["choices"]] if r.status_code == 200 else []
                return time.monotonic() - t0, toks, ",".join(ids), r.status_code

            async def trainer_client(k: int) -> list[tuple[float, str, dict | None, int]]:
                out = []
                for j in range(args.steps):
                    key = f"c{k}-{j}-{uuid.uuid4().hex[:6]}"
                    t0 = time.monotonic()
                    r = await t.post("/forward", json={"data": [datum(64, k * 100 + j)]}, headers={"Idempotency-Key": key})
                    p = await result(t, r.json()["operation_id"]) if r.status_code == 202 else r
                    out.append((time.monotonic() - t0, key, p.json().get("result") if p.status_code == 200 else None,
                                p.status_code))
                return out

            t0 = time.monotonic()
            samples, trains = await asyncio.gather(
                asyncio.gather(*(sample(i) for i in range(args.samplers))),
                asyncio.gather(*(trainer_client(k) for k in range(args.trainers))))
            wall = time.monotonic() - t0
            # Reference: the same requests one at a time (the fake engine is deterministic).
            ref_samples = [await sample(i) for i in range(args.samplers)]
            s_err = sum(1 for x in samples if x[3] != 200)
            s_wrong = sum(1 for x, ref in zip(samples, ref_samples) if x[1] != ref[1])
            all_ids = [i for x in samples for i in x[2].split(",") if i]
            s_dup = len(all_ids) - len(set(all_ids))
            flat = [x for tr in trains for x in tr]
            t_err = sum(1 for x in flat if x[3] != 200)
            ref_losses = {}
            for k in range(args.trainers):
                for j in range(args.steps):
                    r = await t.post("/forward", json={"data": [datum(64, k * 100 + j)]})
                    ref_losses[(k, j)] = (await result(t, r.json()["operation_id"])).json()["result"]["metrics"]
            t_wrong = sum(1 for k, tr in enumerate(trains) for j, x in enumerate(tr)
                          if x[2] is None or x[2]["metrics"] != ref_losses[(k, j)])
            t_keys = [x[1] for x in flat]
            print(f"{args.samplers} concurrent /sample (n=2, 16 tokens) + {args.trainers} training clients x "
                  f"{args.steps} forward ops, wall {wall:.1f}s")
            print(f"samples: {len(samples)} answered, lost {args.samplers - len(samples)}, errors {s_err}, "
                  f"wrong (vs sequential) {s_wrong}, duplicated sequence ids {s_dup}; latency p50 "
                  f"{pct([x[0] for x in samples], 50) * 1000:.0f} ms p99 {pct([x[0] for x in samples], 99) * 1000:.0f} ms")
            print(f"training ops: {len(flat)} answered, lost {args.trainers * args.steps - len(flat)}, errors {t_err}, "
                  f"wrong (vs sequential) {t_wrong}, duplicated {len(t_keys) - len(set(t_keys))}; latency p50 "
                  f"{pct([x[0] for x in flat], 50) * 1000:.0f} ms p99 {pct([x[0] for x in flat], 99) * 1000:.0f} ms")

    try:
        asyncio.run(main())
    finally:
        stop(proc)


# ---- RSS ----------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss(args: argparse.Namespace) -> None:
    env = {"LOOPS_MAX_RESULT_BYTES": str(args.cap_mb << 20)} if args.cap_mb else {}
    proc, urls = start_server(**env)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=urls["trainer"], timeout=300) as c:
            await result(c, (await c.post("/init_trainer_server", json={"lora_rank": 8})).json()["operation_id"])
            before = rss_mb(proc.pid)
            body = {"data": [datum(args.tokens)]}
            marks = {}
            t0 = time.monotonic()
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with gate:
                    r = await c.post("/forward", json=body)
                    await result(c, r.json()["operation_id"])

            step = max(1, args.ops // 5)
            for start in range(0, args.ops, step):
                await asyncio.gather(*(one(i) for i in range(start, min(args.ops, start + step))))
                marks[min(args.ops, start + step)] = rss_mb(proc.pid)
            print(f"{args.ops} forward ops of {args.tokens} tokens (results ~{args.tokens * 20 // 1024} KB each) in "
                  f"{time.monotonic() - t0:.0f}s; result store cap "
                  f"{args.cap_mb or 128} MiB of JSON")
            print(f"server RSS: {before:.0f} MB after init; " +
                  ", ".join(f"{n} ops: {mb:.0f} MB" for n, mb in marks.items()))

    try:
        asyncio.run(main())
    finally:
        stop(proc)


def fuzz(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", str(root / "tests" / "test_fuzz.py"), "-k", "fuzz_"],
                   env={**os.environ, "LOOPS_FUZZ_EXAMPLES": str(args.n)}, check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sigterm")
    ld = sub.add_parser("load")
    ld.add_argument("--samplers", type=int, default=256)
    ld.add_argument("--trainers", type=int, default=16)
    ld.add_argument("--steps", type=int, default=8)
    r = sub.add_parser("rss")
    r.add_argument("--ops", type=int, default=10_000)
    r.add_argument("--tokens", type=int, default=4096)
    r.add_argument("--cap-mb", type=int, default=0, help="LOOPS_MAX_RESULT_BYTES in MiB (default: the server's)")
    fz = sub.add_parser("fuzz")
    fz.add_argument("--n", type=int, default=5000)
    args = p.parse_args()
    {"sigterm": sigterm, "load": load, "rss": rss, "fuzz": fuzz}[args.cmd](args)


if __name__ == "__main__":
    main()
