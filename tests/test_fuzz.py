"""Property-based fuzzing of the trainer and sampler servers (fake engine, in-process ASGI).

Hypothesis mutates valid request bodies (a field replaced by any JSON value or a nasty one, removed,
or the bytes corrupted), headers (Authorization with non-ASCII bytes, Idempotency-Key, the
sampler's version and checkpoint headers) and query strings, and sends them to the real server
apps. Every answer must be below 500 and come within ``BOUND_S``. Accepted requests are recorded;
afterwards the same accepted requests are replayed on a fresh server and a fixed valid sequence
must give the same result on both: rejected requests changed nothing.

``LOOPS_FUZZ_EXAMPLES`` (default 1000) sets the requests per server; e.g. 20000 for a long run.
Each test prints one summary line: requests, 2xx, 4xx, 5xx, slow, state unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loops_backends.fake.backend import fake_pair
from loops_core.server.http import find_guard

EXAMPLES = int(os.environ.get("LOOPS_FUZZ_EXAMPLES") or 1000)
BOUND_S = 5.0
KEY = "fuzz-key-0123456789"

NASTY = [float("nan"), float("inf"), -float("inf"), 1e300, -1e300, True, False, None, "1", "", 2**63, 2**64, -1, 0,
         [], {}, [[]], "\ud800", "../../etc", "/etc", "x" * 300, "é", 10**30, 0.5, -0.0, [1, "2"], {"a": None}]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
value = st.one_of(st.sampled_from(NASTY), json_any)


def _datum(tokens=(1, 2, 3, 4)) -> dict[str, Any]:
    n = len(tokens)
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(tokens)}]},
            "loss_fn_inputs": {"target_tokens": {"data": list(tokens[1:]) + [0], "dtype": "int64", "shape": [n]},
                               "weights": {"data": [1.0] * n, "dtype": "float32", "shape": [n]}}}


def _rl_datum() -> dict[str, Any]:
    d = _datum()
    for k, v in (("logprobs", -1.0), ("advantages", 0.5)):
        d["loss_fn_inputs"][k] = {"data": [v] * 4, "dtype": "float32", "shape": [4]}
    return d


TRAINER_BODIES: dict[str, dict[str, Any]] = {
    "/forward_backward": {"data": [_datum()], "loss_fn": "cross_entropy", "loss_fn_config": None, "seq_id": 2,
                          "model": "m", "run_id": "r"},
    "/forward": {"data": [_rl_datum()], "loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": 0.8}},
    "/optim_step": {"adam_params": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                                    "weight_decay": 0.0, "grad_clip_norm": 1.0}, "seq_id": 3},
    "/save_state": {"name": "ck", "ttl_seconds": None},
    "/save_weights_for_sampler": {"name": "pub", "bump_version": True},
    "/load_state": {"path": "loops://r/weights/ck"},
    "/load_state_with_optimizer": {"path": "loops://r/weights/ck"},
    "/init_trainer_server": {"lora_rank": 4, "seed": 0},
}
SAMPLER_BODIES: dict[str, dict[str, Any]] = {
    "/sample": {"prompt": [1, 2, 3], "n": 2, "max_tokens": 4, "temperature": 1.0, "top_p": 0.9, "top_k": 5,
                "seed": 1, "stop": ["x"], "stop_token_ids": [0], "prompt_logprobs": 1, "model": "m"},
    "/v1/completions": {"prompt": [[1, 2]], "max_tokens": 2, "stop": [7], "ignore_eos": True},
    "/v1/load_lora_adapter": {"lora_name": "a", "lora_path": "/nowhere", "policy_version": 1},
    "/v1/unload_lora_adapter": {"lora_name": "a"},
}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(body: Any, where: tuple, how: str, new: Any) -> Any:
    if not where:
        return new
    body = json.loads(json.dumps(body))
    parent = body
    for k in where[:-1]:
        parent = parent[k]
    if how == "drop":
        del parent[where[-1]]
    else:
        parent[where[-1]] = new
    return body


@st.composite
def requests(draw, bodies: dict[str, dict[str, Any]], role: str):
    kind = draw(st.sampled_from(["body", "body", "body", "bytes", "get", "headers"]))
    path = draw(st.sampled_from(sorted(bodies)))
    body = bodies[path]
    headers: dict[str, Any] = {"Authorization": f"Api-Key {KEY}"}
    if kind == "get":
        path = draw(st.sampled_from(["/operations/", "/checkpoint_files", "/health", "/get_info", "/v1/models",
                                     "/policy_version"]))
        suffix = draw(st.text(min_size=0, max_size=20).map(lambda t: quote(t, safe="")))
        query = {k: draw(st.one_of(st.text(max_size=10), st.sampled_from(["nan", "inf", "-1", "1e999", "0"])))
                 for k in draw(st.lists(st.sampled_from(["timeout", "page_size", "page_token", "checkpoint_id"]),
                                        max_size=3))}
        return "GET", (path + suffix if path.endswith("/") else path), query, headers, None
    content: bytes
    if kind == "bytes":
        raw = json.dumps(body).encode()
        cut = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"NaN", b"[" * 100, b"\xed\xa0\x80", b""]))
        content = raw[:cut] + junk + raw[cut + draw(st.integers(0, 3)):]
    else:
        where = draw(st.sampled_from(_paths(body)))
        how = draw(st.sampled_from(["set", "set", "drop"])) if where else "set"
        mutated = _mutate(body, where, how, draw(value))
        content = json.dumps(mutated, allow_nan=True).encode()
    if kind == "headers":
        name = draw(st.sampled_from(["Authorization", "Idempotency-Key", "X-Checkpoint-Path", "X-Policy-Version",
                                     "X-Min-Policy-Version", "Content-Length"] if role == "sampler" else
                                    ["Authorization", "Idempotency-Key", "Content-Length"]))
        if name == "Content-Length":
            headers[name] = str(draw(st.integers(0, 10**12)))
        else:
            headers[name] = draw(st.one_of(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(
                b"\n", b"")), st.sampled_from([b"Api-Key \xe9\xe8", b"0", b"-1", b"99999999999999999999", b"nan",
                                               b"/etc", b"../../x", b"loops://../weights/x"])))
    return "POST", path, None, headers, content


class Fuzzer:
    """Drives one server on one event loop; records what it accepted."""

    def __init__(self, role: str):
        self.role = role
        self.loop = asyncio.new_event_loop()
        self.trainer, self.sampler = fake_pair("m", rank=4, seed=0, run_id="r", poll_hold=1.0)  # as the bodies name them
        self.trainer.gap_wait = 0.01
        for s in (self.trainer, self.sampler):
            find_guard(s.app).api_key = KEY.encode()
        self.trainer.sampler.headers = {"Authorization": f"Api-Key {KEY}"}
        self.app = self.trainer.app if role == "trainer" else self.sampler.app
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://fuzz",
                                        timeout=BOUND_S * 4)
        self.counts: Counter = Counter()
        self.slow: list[str] = []
        self.max_s = 0.0
        self.accepted: list[tuple[str, bytes, dict[str, Any]]] = []
        self.run(setup(self.client, self.role))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def send(self, method: str, path: str, query: Any, headers: dict[str, Any], content: bytes | None) -> int:
        async def go() -> int:
            t0 = time.monotonic()
            try:
                r = await self.client.request(method, path, params=query, headers=headers, content=content)
            except (httpx.LocalProtocolError, httpx.InvalidURL):  # httpx would not send it: not the server's doing
                self.counts["unsendable"] += 1
                return 0
            status = r.status_code
            if status == 202:  # wait for the operation, so replay order equals execution order
                op = quote(r.json()["operation_id"], safe="")
                while (p := await self.client.get(f"/operations/{op}", headers={"Authorization": f"Api-Key {KEY}"})
                       ).status_code == 408:
                    pass
                assert p.status_code < 500, p.text
            elapsed = time.monotonic() - t0
            self.max_s = max(self.max_s, elapsed)
            if elapsed > BOUND_S:
                self.slow.append(f"{method} {path} {elapsed:.1f}s")
            if method == "POST" and 200 <= status < 300:
                self.accepted.append((path, content or b"", headers))
            return status

        status = self.run(go())
        if status:
            self.counts[f"{status // 100}xx"] += 1
        return status

    def close(self) -> None:
        self.run(self.client.aclose())
        self.trainer.close()

        async def cancel_rest() -> None:  # the queue's runner waits forever for work
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.close()


async def setup(client: httpx.AsyncClient, role: str) -> None:
    h = {"Authorization": f"Api-Key {KEY}"}
    if role == "trainer":
        r = await client.post("/init_trainer_server", json={"lora_rank": 4, "seed": 0}, headers=h)
        while (await client.get(f"/operations/{r.json()['operation_id']}", headers=h)).status_code == 408:
            pass


async def fixed_sequence(trainer_app: Any, sampler_app: Any, role: str) -> Any:
    """A valid sequence whose result depends on all server state that matters."""
    h = {"Authorization": f"Api-Key {KEY}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=trainer_app), base_url="http://t") as t, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=sampler_app), base_url="http://s") as s:
        if role == "sampler":
            r = await s.post("/sample", json={"prompt": [5, 6, 7], "n": 3, "max_tokens": 8, "seed": 42,
                                              "prompt_logprobs": 2}, headers=h)
            assert r.status_code == 200, r.text
            out = r.json()
            return [c["token_ids"] for c in out["choices"]], out.get("prompt_logprobs"), \
                r.headers["x-trainers-policy-version"]
        results = []
        for path, body in [("/forward_backward", {"data": [_datum((3, 4, 5, 6))]}),
                           ("/optim_step", {"adam_params": {"learning_rate": 0.05}}),
                           ("/forward", {"data": [_datum((3, 4, 5, 6))]})]:
            r = await t.post(path, json=body, headers=h)
            assert r.status_code == 202, r.text
            while (p := await t.get(f"/operations/{r.json()['operation_id']}", headers=h)).status_code == 408:
                pass
            results.append(p.json()["result"])
        return results[-1]["metrics"], results[-1]["loss_fn_outputs"]


def _fuzz(role: str, bodies: dict[str, dict[str, Any]]) -> None:
    fz = Fuzzer(role)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests(bodies, role))
    def one(req):
        status = fz.send(*req)
        assert status < 500, f"{status} for {req!r:.600}"

    try:
        one()
        sent = sum(v for k, v in fz.counts.items() if k.endswith("xx"))
        # Same accepted requests on a fresh server, then the same fixed sequence on both.
        fresh = Fuzzer(role)
        for path, content, headers in fz.accepted:
            status = fresh.send("POST", path, None, headers, content)
            assert 200 <= status < 300, (path, content[:200])
        got = fz.run(fixed_sequence(fz.trainer.app, fz.sampler.app, role))
        want = fresh.run(fixed_sequence(fresh.trainer.app, fresh.sampler.app, role))
        fresh.close()
        print(f"\nfuzz {role}: {sent} requests, 2xx={fz.counts['2xx']} 4xx={fz.counts['4xx']} "
              f"5xx={fz.counts['5xx']} slow(>{BOUND_S}s)={len(fz.slow)} slowest={fz.max_s * 1000:.0f}ms "
              f"unsendable={fz.counts['unsendable']} "
              f"state unchanged={got == want}")
        assert fz.counts["5xx"] == 0 and not fz.slow, fz.slow
        assert sent >= EXAMPLES * 0.9
        assert got == want, "rejected requests changed the server's state"
    finally:
        fz.close()


def test_fuzz_trainer_no_5xx_no_hang_state_unchanged():
    _fuzz("trainer", TRAINER_BODIES)


def test_fuzz_sampler_no_5xx_no_hang_state_unchanged():
    _fuzz("sampler", SAMPLER_BODIES)


@pytest.mark.parametrize("route", sorted(TRAINER_BODIES))
def test_the_unmutated_bodies_are_accepted(route):
    """The fuzz starts from valid requests: a broken seed body would make every mutation trivially 4xx."""
    fz = Fuzzer("trainer")
    try:
        if route.startswith("/load_state"):
            fz.send("POST", "/save_state", None, {"Authorization": f"Api-Key {KEY}"}, b'{"name": "ck"}')
            body = {"path": f"loops://{fz.trainer.run_id}/weights/ck"}
        else:
            body = TRAINER_BODIES[route]
        assert fz.send("POST", route, None, {"Authorization": f"Api-Key {KEY}"}, json.dumps(body).encode()) == 202
    finally:
        fz.close()
