"""The real tinker SDK (0.38.0, in a side venv) drives ``loops serve --api tinker``.

The server runs as a subprocess (``--engine fake``; one test on ``--engine local`` with
``loops/tiny-qwen3``). Each scenario is a small script run by the side venv's interpreter with
``TINKER_BASE_URL`` pointed at the server; it prints one JSON line of figures that the test checks.
The SDK is unmodified: whatever it does on the wire (protobuf + zstd bodies, futures polled with
``retrieve_future``, sessions and heartbeats, telemetry) is its own.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sidevenv import side_venv

pytest.importorskip("google.protobuf")
pytest.importorskip("zstandard")

SDK = "0.38.0"
DRIVER = r'''
import json, sys, threading, time
import tinker
from tinker import types

assert tinker.__version__ == "0.38.0", tinker.__version__
BASE = "loops/tiny-qwen3"
TOKENS = [10, 20, 30, 40, 50, 60, 70, 80, 90]


def sl_datum(tokens):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def train(tc, data, steps, lr=0.05):
    """Submit every step before waiting on any (futures in flight); losses in order."""
    futures = [(tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=lr)))
               for _ in range(steps)]
    losses = []
    for fb, op in futures:
        losses.append(fb.result().metrics["loss:sum"])
        op.result()
    return losses


def fwd_loss(tc, data):
    return tc.forward(data, "cross_entropy").result().metrics["loss:sum"]


def supervised(sc):
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    data = [sl_datum(TOKENS), sl_datum(TOKENS[2:])]
    steps, lr = (int(sys.argv[2]), float(sys.argv[3])) if len(sys.argv) > 3 else (12, 0.05)
    losses = train(tc, data, steps, lr)
    out = tc.forward(data, "cross_entropy").result()
    # more datums than the SDK puts in one request (1024): several chunks, recombined by the SDK
    copies = 1100 if "--no-chunks" not in sys.argv else 1
    many = tc.forward([data[0]] * copies, "cross_entropy").result()
    one = tc.forward([data[0]], "cross_entropy").result()
    client = tc.save_weights_and_get_sampling_client()
    sample = client.sample(types.ModelInput.from_ints(TOKENS[:4]), num_samples=2,
                           sampling_params=types.SamplingParams(max_tokens=4, seed=3)).result()
    return {"model_id": tc.model_id, "losses": losses, "forward_loss": out.metrics["loss:sum"],
            "chunked": [len(many.loss_fn_outputs), many.metrics["loss:sum"], one.metrics["loss:sum"]],
            "logprob_shapes": [o["logprobs"].shape for o in out.loss_fn_outputs],
            "info": tc.get_info().model_dump(mode="json"),
            "samples": [s.tokens for s in sample.sequences], "sequence_ids": [s.sequence_id for s in sample.sequences]}


def rl(sc):
    """Sample with logprobs -> importance_sampling -> optim_step -> a new pinned sampler, 3 times.

    Per iteration: the sampler's logprob of the best and of the worst sequence, before and after
    the step (the policy must move toward the best), and the mean reward (a figure)."""
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=1).result()
    prompt = [40, 41, 42]
    client = tc.save_weights_and_get_sampling_client().result()
    rewards, gaps, moves = [], [], []

    def seq_logprob(sampler, tokens):
        lps = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + tokens)).result()
        return sum(lps[len(prompt):])

    for it in range(3):
        res = client.sample(types.ModelInput.from_ints(prompt), num_samples=8,
                            sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=it)).result()
        scores = [sum(t < 128 for t in s.tokens) / len(s.tokens) for s in res.sequences]
        mean = sum(scores) / len(scores)
        rewards.append(mean)
        data = []
        for s, r in zip(res.sequences, scores):
            full = prompt + s.tokens
            n_prompt = len(prompt) - 1
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": full[1:], "logprobs": [0.0] * n_prompt + list(s.logprobs),
                                "advantages": [0.0] * n_prompt + [r - mean] * len(s.tokens)}))
        fb = tc.forward_backward(data, "importance_sampling")
        op = tc.optim_step(types.AdamParams(learning_rate=0.1))
        out = fb.result()
        op.result()
        # on-policy: the trainer's logprobs of the sampled tokens equal the sampler's
        for o, s in zip(out.loss_fn_outputs, res.sequences):
            gaps.append(max(abs(a - b) for a, b in zip(o["logprobs"].tolist()[len(prompt) - 1:], s.logprobs)))
        best = res.sequences[max(range(8), key=lambda i: scores[i])].tokens
        worst = res.sequences[min(range(8), key=lambda i: scores[i])].tokens
        new_client = tc.save_weights_and_get_sampling_client().result()
        moves.append([seq_logprob(new_client, best) - seq_logprob(client, best),
                      seq_logprob(new_client, worst) - seq_logprob(client, worst)])
        client = new_client
    return {"rewards": rewards, "max_logprob_gap": max(gaps), "best_worst_moves": moves}


def state(sc):
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=2).result()
    data = [sl_datum(TOKENS)]
    train(tc, data, 3)
    saved = tc.save_state("ckpt-1").result().path
    sampler_path = tc.save_weights_for_sampler("sampler-1").result().path
    at_save = fwd_loss(tc, data)
    params = types.SamplingParams(max_tokens=6, seed=7)
    prompt = types.ModelInput.from_ints(TOKENS[:3])
    pinned = tc.save_weights_and_get_sampling_client().sample(prompt, 1, params).result().sequences[0].tokens
    from_path = sc.create_sampling_client(model_path=sampler_path).sample(prompt, 1, params).result()
    base = sc.create_sampling_client(base_model=BASE)
    base_tokens = base.sample(prompt, 1, params).result().sequences[0].tokens
    after_more = train(tc, data, 2)[-1]
    tc.load_state(saved).result()
    after_load = fwd_loss(tc, data)
    tc.load_state_with_optimizer(saved).result()
    resumed = train(tc, data, 2)
    clone = sc.create_training_client_from_state_with_optimizer(saved).result()
    clone_loss = fwd_loss(clone, data)
    clone_resumed = train(clone, data, 2)
    weights_only = sc.create_training_client_from_state(saved).result()
    rest = sc.create_rest_client()
    runs = rest.list_training_runs().result()
    run = rest.get_training_run(tc.model_id).result()
    ckpts = rest.list_checkpoints(tc.model_id).result()
    mine = rest.list_user_checkpoints().result()
    info = rest.get_weights_info_by_tinker_path(saved).result()
    caps = sc.get_server_capabilities()
    return {"saved": saved, "sampler_path": sampler_path, "at_save": at_save, "after_more": after_more,
            "after_load": after_load, "resumed": resumed, "clone_id": clone.model_id, "clone_loss": clone_loss,
            "clone_resumed": clone_resumed, "weights_only_loss": fwd_loss(weights_only, data),
            "pinned_tokens": pinned, "path_tokens": from_path.sequences[0].tokens, "base_tokens": base_tokens,
            "base_sampler_model": base.get_base_model(),
            "runs": [r.training_run_id for r in runs.training_runs], "runs_total": runs.cursor.total_count,
            "run": {"id": run.training_run_id, "rank": run.lora_rank, "base": run.base_model,
                    "last": run.last_checkpoint.tinker_path if run.last_checkpoint else None},
            "checkpoints": sorted((c.checkpoint_type, c.tinker_path) for c in ckpts.checkpoints),
            "user_checkpoints": len(mine.checkpoints), "weights_info": info.model_dump(mode="json"),
            "capabilities": [m.model_name for m in caps.supported_models]}


def reopen(sc):
    """A fresh server process over the same LOOPS_HOME: the paths an earlier one handed out still work."""
    saved, sampler_path = sys.argv[2], sys.argv[3]
    rest = sc.create_rest_client()
    prompt = types.ModelInput.from_ints(TOKENS[:3])
    sample = sc.create_sampling_client(model_path=sampler_path).sample(
        prompt, 1, types.SamplingParams(max_tokens=6, seed=7)).result()
    clone = sc.create_training_client_from_state(saved).result()
    return {"tokens": sample.sequences[0].tokens, "rank": rest.get_weights_info_by_tinker_path(saved).result().lora_rank,
            "loss": fwd_loss(clone, [sl_datum(TOKENS)])}


def concurrent(sc):
    """Two models trained at once in two threads; a third, alone, repeats the first one's data."""
    first, second = [sl_datum(TOKENS)], [sl_datum([200, 150, 100, 50, 25, 12])]
    results = {}

    def run(name, data):
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=5).result()
        results[name] = train(tc, data, 6)

    threads = [threading.Thread(target=run, args=a) for a in (("a", first), ("b", second))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    run("alone", first)
    return results


def errors(sc):
    import httpx
    from tinker._client import AsyncTinker
    from tinker.types.shared.untyped_api_future import UntypedAPIFuture
    import asyncio

    out = {}

    def expect(name, fn):
        t0 = time.time()
        try:
            fn()
            out[name] = ["no error", 0.0]
        except Exception as exc:  # the class and how long it took to surface
            out[name] = [type(exc).__name__, round(time.time() - t0, 2), str(exc)[:200]]

    tc = sc.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
    data = [sl_datum(TOKENS)]
    before = fwd_loss(tc, data)
    rest = sc.create_rest_client()
    expect("unknown_run", lambda: rest.get_training_run("s-nope:train:0").result())
    expect("bad_rank", lambda: sc.create_lora_training_client(base_model=BASE, rank=0).result())
    expect("unknown_checkpoint", lambda: rest.get_weights_info_by_tinker_path(
        "tinker://" + tc.model_id + "/weights/missing").result())
    expect("unsupported_publish", lambda: rest.publish_checkpoint_from_tinker_path(
        "tinker://" + tc.model_id + "/weights/missing").result())

    async def raw():
        client = AsyncTinker(base_url=sys.argv[2] if len(sys.argv) > 2 else None, max_retries=0)
        async def post(path, body, headers):
            return await client.post(path, body=body, cast_to=UntypedAPIFuture,
                                     options={"headers": headers})
        for name, path, body, headers in [
            ("bad_protobuf", "/api/v1/forward_backward", b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"}),
            ("bad_zstd", "/api/v1/forward_backward", b"nope", {"Content-Type": "application/x-protobuf",
                                                             "Content-Encoding": "zstd"}),
            ("bad_json", "/api/v1/optim_step", b"{not json", {"Content-Type": "application/json"}),
            ("unknown_model", "/api/v1/optim_step", {"model_id": "s-nope:train:9", "adam_params": {}}, {}),
        ]:
            t0 = time.time()
            try:
                await post(path, body, headers)
                out[name] = ["no error", 0.0]
            except Exception as exc:
                out[name] = [type(exc).__name__, round(time.time() - t0, 2), str(exc)[:200]]
        await client.close()

    asyncio.run(raw())
    expect("mismatched_lengths", lambda: tc.forward_backward([types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3]})],
        "cross_entropy").result())
    fresh = sc.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
    out["loss_unchanged"] = [before, fwd_loss(fresh, data)]
    return out


def auth(sc_unused):
    t0 = time.time()
    try:
        tinker.ServiceClient().create_lora_training_client(base_model=BASE, rank=4).result()
        return {"error": None}
    except Exception as exc:
        return {"error": type(exc).__name__, "seconds": round(time.time() - t0, 2), "message": str(exc)[:200]}


if __name__ == "__main__":
    scenario = sys.argv[1]
    t0 = time.time()
    sc = None if scenario == "auth" else tinker.ServiceClient()
    result = globals()[scenario](sc)
    result["seconds"] = round(time.time() - t0, 2) if scenario != "auth" else result.get("seconds")
    print(json.dumps(result))
    if sc is not None:
        sc.close("success").result()
'''


class Server:
    """``loops serve --api tinker`` as a subprocess on a free port; stopped by PID."""

    def __init__(self, tmp: Path, engine: str, *, api_key: str | None = None, extra: tuple[str, ...] = ()):
        env = {**os.environ, "LOOPS_HOME": str(tmp / "home")}
        env.pop("LOOPS_API_KEY", None)
        if api_key:
            env["LOOPS_API_KEY"] = api_key
        self.log = tmp / f"server-{engine}-{len(list(tmp.glob('server-*.log')))}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loops_core.cli", "serve", "--api", "tinker", "--engine", engine,
             "--model", "loops/tiny-qwen3", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError(f"the server did not start: {self.log.read_text()[-2000:]}") from None
            if line.startswith("{"):
                self.url = json.loads(line)["urls"]["tinker"]
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def tinker_python() -> Path:
    return side_venv(f"tinker-{SDK}", [f"tinker=={SDK}"], python=(3, 11))


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory):
    server = Server(tmp_path_factory.mktemp("tinker-api-fake"), "fake")
    yield server
    server.stop()


def drive(python: Path, server: Server, scenario: str, *args: str, api_key: str = "tml-local",
          timeout: float = 180) -> dict:
    script = server.log.parent / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": api_key}
    done = subprocess.run([str(python), str(script), scenario, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=server.log.parent)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    assert done.returncode == 0 and last.startswith("{"), (
        f"{scenario} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n"
        f"server log:\n{server.log.read_text()[-3000:]}")
    result = json.loads(last)
    print(f"\n[{scenario}] {json.dumps(result)[:1500]}")
    return result


def test_supervised_loop_with_futures_in_flight(tinker_python: Path, fake_server: Server):
    r = drive(tinker_python, fake_server, "supervised")
    losses = r["losses"]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # each step runs after the one before
    assert r["forward_loss"] < losses[-1]  # forward after the last optim_step sees the trained weights
    assert r["logprob_shapes"] == [[8], [6]]
    outputs, many, one = r["chunked"]
    assert outputs == 1100 and many == pytest.approx(1100 * one, rel=1e-6)
    assert r["info"]["model_id"] == r["model_id"] and r["info"]["lora_rank"] == 8
    assert [len(s) for s in r["samples"]] == [4, 4] and len(set(r["sequence_ids"])) == 2


def test_rl_loop_importance_sampling(tinker_python: Path, fake_server: Server):
    r = drive(tinker_python, fake_server, "rl")
    assert r["max_logprob_gap"] < 1e-3, r  # the sampler and trainer agree on the sampled tokens
    for best, worst in r["best_worst_moves"]:  # each step moves the policy toward the better sequence
        assert best > 0 > worst, r["best_worst_moves"]


def test_save_load_sample_from_path_and_rest_listing(tinker_python: Path, fake_server: Server):
    r = drive(tinker_python, fake_server, "state")
    model_id = r["run"]["id"]
    assert r["saved"] == f"tinker://{model_id}/weights/ckpt-1"
    assert r["sampler_path"] == f"tinker://{model_id}/sampler_weights/sampler-1"
    assert r["after_more"] != pytest.approx(r["at_save"])
    assert r["after_load"] == pytest.approx(r["at_save"], rel=1e-6)
    assert r["clone_loss"] == pytest.approx(r["at_save"], rel=1e-6)
    assert r["weights_only_loss"] == pytest.approx(r["at_save"], rel=1e-6)
    assert r["resumed"][1] == pytest.approx(r["after_more"], rel=1e-9)  # Adam moments restored: same next step
    assert r["clone_resumed"] == pytest.approx(r["resumed"], rel=1e-6)  # and into a new model too
    assert r["path_tokens"] == r["pinned_tokens"]  # the saved path samples the same weights
    assert r["base_tokens"] != r["pinned_tokens"] and r["base_sampler_model"] == "loops/tiny-qwen3"
    assert model_id in r["runs"] and r["clone_id"] in r["runs"] and r["runs_total"] >= 3
    assert r["run"]["rank"] == 8 and r["run"]["base"] == "loops/tiny-qwen3"
    assert ["training", r["saved"]] in r["checkpoints"]
    assert ["sampler", r["sampler_path"]] in r["checkpoints"]
    assert r["user_checkpoints"] >= 2
    assert r["weights_info"]["lora_rank"] == 8 and r["weights_info"]["base_model"] == "loops/tiny-qwen3"
    assert r["capabilities"] == ["loops/tiny-qwen3"]

    again = Server(fake_server.log.parent, "fake")  # a restarted server over the same LOOPS_HOME
    try:
        reopened = drive(tinker_python, again, "reopen", r["saved"], r["sampler_path"])
    finally:
        again.stop()
    assert reopened["tokens"] == r["pinned_tokens"] and reopened["rank"] == 8
    assert reopened["loss"] == pytest.approx(r["at_save"], rel=1e-6)


def test_two_concurrent_models_are_independent(tinker_python: Path, fake_server: Server):
    r = drive(tinker_python, fake_server, "concurrent")
    assert r["a"] == pytest.approx(r["alone"], rel=1e-9)
    assert r["a"] != pytest.approx(r["b"])
    assert r["a"][-1] < r["a"][0] and r["b"][-1] < r["b"][0]


def test_bad_input_gets_the_matching_sdk_error_at_once(tinker_python: Path, fake_server: Server):
    r = drive(tinker_python, fake_server, "errors", fake_server.url)
    expected = {"unknown_run": "NotFoundError", "unknown_checkpoint": "NotFoundError", "bad_rank": "BadRequestError",
                "unsupported_publish": "BadRequestError", "bad_protobuf": "BadRequestError",
                "bad_zstd": "BadRequestError", "bad_json": "BadRequestError", "unknown_model": "NotFoundError",
                "mismatched_lengths": "BadRequestError"}
    for name, cls in expected.items():
        assert r[name][0] == cls and r[name][1] < 5.0, (name, r[name])
    before, fresh = r["loss_unchanged"]
    assert fresh == pytest.approx(before)  # the same seed and data after the bad requests: nothing leaked


def test_a_retried_submission_runs_once(fake_server: Server):
    """The SDK retries a POST with the same X-Idempotency-Key: the server answers it with the first
    submission's future instead of running it twice (plain HTTP, the SDK's wire shapes)."""
    import httpx

    with httpx.Client(base_url=fake_server.url, headers={"X-API-Key": "tml-local"}, timeout=60) as http:
        session = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": SDK})
        body = {"session_id": session.json()["session_id"], "model_seq_id": 0, "base_model": "loops/tiny-qwen3",
                "lora_config": {"rank": 4}}
        request_id = http.post("/api/v1/create_model", json=body).json()["request_id"]
        while (done := http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()).get(
                "type") == "try_again":
            pass
        step = {"model_id": done["model_id"], "adam_params": {"learning_rate": 0.1}, "seq_id": 1}
        first, again, other = (http.post("/api/v1/optim_step", json=step, headers={"X-Idempotency-Key": key}).json()
                               for key in ("k-1", "k-1", "k-2"))
        assert first["request_id"] == again["request_id"] != other["request_id"]


def test_wrong_api_key_is_an_authentication_error(tinker_python: Path, tmp_path: Path):
    server = Server(tmp_path, "fake", api_key="tml-the-right-key")
    try:
        wrong = drive(tinker_python, server, "auth", api_key="tml-a-wrong-key")
        assert wrong["error"] == "AuthenticationError" and wrong["seconds"] < 5.0, wrong
        right = drive(tinker_python, server, "auth", api_key="tml-the-right-key")
        assert right["error"] is None, right
    finally:
        server.stop()


def test_off_loopback_needs_a_key_from_env_or_file(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "LOOPS_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "loops_core.cli", "serve", "--api", "tinker", "--engine", "fake",
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0 and "LOOPS_API_KEY" in done.stderr and "--api-key-file" in done.stderr
    done = subprocess.run([sys.executable, "-m", "loops_core.cli", "serve", "--api", "tinker", "--api-key", "x"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0  # a key is never a command-line value

    import httpx

    key_file = tmp_path / "key"
    key_file.write_text("tml-from-a-file\n")
    server = Server(tmp_path, "fake", extra=("--api-key-file", str(key_file)))
    try:
        caps = server.url + "/api/v1/get_server_capabilities"
        assert httpx.get(caps).status_code == 401
        assert httpx.get(caps, headers={"X-API-Key": "tml-from-a-file"}).status_code == 200
        assert httpx.get(server.url + "/api/v1/healthz").json() == {"status": "ok"}
    finally:
        server.stop()


def test_every_route_the_sdk_can_call_is_served(tinker_python: Path):
    """Parse the routes out of the installed SDK's source; a new SDK route fails here, loudly."""
    from loops_core.tinker_api import create_app

    probe = r'''
import json, pathlib, re, tinker
root = pathlib.Path(tinker.__file__).parent
call = re.compile(r'\.(_?(?:get|post|put|delete|patch))\(\s*f?"(/api/v1/[^"]*)"', re.S)
named = re.compile(r'_request\(\s*"(GET|POST|PUT|DELETE|PATCH)",\s*f?"(/api/v1/[^"]*)"', re.S)
literal = re.compile(r'^(?!\s*-).*?f?"(/api/v1/[^"]*)"', re.M)
routes, seen = set(), set()
for path in root.rglob("*.py"):
    if path.name.endswith("_test.py"):
        continue
    text = path.read_text()
    for m in call.finditer(text):
        routes.add((m.group(1).lstrip("_").upper(), m.group(2)))
    for m in named.finditer(text):
        routes.add((m.group(1), m.group(2)))
    seen |= {m.group(1) for m in literal.finditer(text)}
print(json.dumps({"version": tinker.__version__, "routes": sorted(routes), "literals": sorted(seen)}))
'''
    done = subprocess.run([str(tinker_python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sdk = json.loads(done.stdout)
    assert sdk["version"] == SDK
    sdk_routes = {(m, p) for m, p in sdk["routes"]}
    assert {p for _, p in sdk_routes} >= set(sdk["literals"]), "an /api/v1 path the probe could not pair with a method"

    def shape(path: str) -> str:
        # Tinker checkpoint ids are "<weights|sampler_weights>/<name>": two path segments
        return re.sub(r"\{[^}]+\}", "{}", path.replace("{checkpoint_id}", "{kind}/{name}"))

    served = {(m, shape(p)) for m, p in create_app(None).state.routes_served}  # type: ignore[arg-type]
    missing = sorted((m, p) for m, p in sdk_routes if (m, shape(p)) not in served)
    assert not missing, f"tinker {SDK} can call routes this server does not answer: {missing}"
    assert len(sdk_routes) >= 45


@pytest.mark.slow
def test_local_engine_tiny_qwen3(tinker_python: Path, tmp_path: Path):
    server = Server(tmp_path, "local")
    try:
        r = drive(tinker_python, server, "supervised", "8", "0.005", "--no-chunks", timeout=400)
    finally:
        server.stop()
    losses = r["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert r["info"]["model_data"]["arch"] and [len(s) for s in r["samples"]] == [4, 4]
