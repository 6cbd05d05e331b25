"""Server reliability (#14): strict validation before queueing, no poisoned state, scoped idempotency
keys, bounded resources, checkpoint paths that stay in their root, graceful shutdown on a real
socket, and the ``loops`` CLI's key handling and messages."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loops_backends.fake.backend import fake_pair
from loops_core.server.http import find_guard
from loops_core.checkpoints import CheckpointStore
from loops_core.errors import InvalidRequestError, NotFoundError, ServerShutdownError
from loops_core.server.operations import OperationQueue
from loops_core.server.requests import Limits
from loops_core.wire import Endpoint, WireClient

FB = "/forward_backward"


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _datum(tokens=(1, 2, 3, 4), **inputs):
    n = len(tokens)
    li = {"target_tokens": {"data": list(tokens[1:]) + [0], "dtype": "int64", "shape": [n]}}
    for k, v in inputs.items():
        li[k] = {"data": v, "dtype": "float32", "shape": [n]}
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(tokens)}]}, "loss_fn_inputs": li}


async def _result(c: httpx.AsyncClient, r: httpx.Response) -> httpx.Response:
    assert r.status_code == 202, r.text
    op = r.json()["operation_id"]
    while True:
        p = await c.get(f"/operations/{op}")
        if p.status_code != 408:
            return p


def _run(coro):
    return asyncio.run(coro)


def test_non_finite_and_loose_inputs_are_refused_at_submit_and_state_is_unchanged():
    trainer, _ = fake_pair("m", rank=4, seed=0)

    async def main():
        async with _client(trainer.app) as c:
            await _result(c, await c.post("/init_trainer_server", json={"lora_rank": 4, "seed": 0}))
            before = (await _result(c, await c.post("/forward", json={"data": [_datum()]}))).json()["result"]
            bad = [
                ({"data": [_datum(weights=[1, float("nan"), 1, 1])]}, "weights"),
                ({"data": [_datum(weights=[1, None, 1, 1])]}, "weights"),
                ({"data": [_datum(weights=[1, 1e300, 1, 1])]}, "weights"),
                ({"data": [_datum(weights=[1, True, 1, 1])]}, "weights"),
                ({"data": [_datum(tokens=(1, "2", 3))]}, "data"),
                ({"data": [_datum(tokens=(1, True, 3))]}, "data"),
                ({"data": [_datum()], "loss_fn_config": [1]}, "loss_fn_config"),
                ({"data": [_datum()], "loss_fn": ["cross_entropy"]}, "loss_fn"),
                ({"data": [_datum()], "seq_id": "1"}, "seq_id"),
            ]
            for body, field in bad:
                raw = json.dumps(body, allow_nan=True)  # NaN as the literal some clients send
                r = await c.post(FB, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400, (body, r.text)
                assert field in r.json()["error"].get("field", "") + r.json()["detail"], r.text
            for adam in [{"learning_rate": 1e309}, {"learning_rate": "0.1"}, {"beta1": True}, {"eps": -1}]:
                raw = json.dumps({"adam_params": adam}).replace("1e309", "Infinity")
                r = await c.post("/optim_step", content=raw)
                assert r.status_code == 400 and "adam_params" in r.json()["error"]["field"], r.text
            after = (await _result(c, await c.post("/forward", json={"data": [_datum()]}))).json()["result"]
            assert after == before

    _run(main())


def test_body_utf8_nesting_size_and_echo_limits():
    trainer, sampler = fake_pair("m", rank=4)
    find_guard(trainer.app).limits = Limits(max_body_bytes=20_000)

    async def main():
        async with _client(trainer.app) as c, _client(sampler.app) as s:
            assert (await c.post(FB, content=b'{"data": "\xff"}')).status_code == 400
            deep = "[" * 5000 + "]" * 5000
            r = await c.post(FB, content=f'{{"data": {deep}}}')
            assert r.status_code == 400 and "nests" in r.json()["detail"]
            r = await c.post(FB, content='{"data": [], "loss_fn": "\\ud800"}')
            assert r.status_code == 400 and "surrogate" in r.json()["detail"]
            r = await c.post(FB, content=b"{" + b" " * 20_000 + b"}")
            assert r.status_code == 413
            big = {"data": [_datum(tuple(range(1, 2000)), weights=[1.0] * 1999)] * 60}  # > 1 MB: parsed off-loop
            big["data"] = big["data"] + [_datum(weights=[1, 1, float("inf"), 1])]
            find_guard(trainer.app).limits = Limits()
            r = await c.post(FB, content=json.dumps(big))
            assert r.status_code == 400 and "data" in r.json()["error"]["field"] and "weights" in r.text, r.text[:300]
            find_guard(trainer.app).limits = Limits(max_body_bytes=20_000)
            r = await c.post("/save_state", json={"name": "x" * 200})
            assert r.status_code == 400 and len(r.content) < 2000
            r = await s.post("/sample", json={"prompt": [1, 2], "n": 10**9})
            assert r.status_code == 400 and r.json()["error"]["field"] == "n" or "n=" in r.json()["detail"]
            r = await s.post("/sample", json={"prompt": [1, 2], "temperature": None, "stop_token_ids": 5})
            assert r.status_code == 400 and "stop_token_ids" in r.json()["detail"]
            r = await s.post("/sample", json={"prompt": [1, 2], "max_tokens": 2**60})
            assert r.status_code == 400

    _run(main())


def test_non_ascii_authorization_is_a_401_on_every_route():
    trainer, sampler = fake_pair("m", rank=4)
    for server in (trainer, sampler):
        find_guard(server.app).api_key = b"k" * 16

    async def main():
        for app, path in [(trainer.app, "/forward_backward"), (trainer.app, "/operations/x"), (sampler.app, "/sample")]:
            async with _client(app) as c:
                r = await c.request("POST" if "operations" not in path else "GET", path,
                                    headers=[(b"authorization", b"Api-Key \xe9\xff")], content=b"{}")
                assert r.status_code == 401, r.text
                r = await c.get("/health", headers=[(b"authorization", b"\xff")])
                assert r.status_code == 200

    _run(main())


def test_idempotency_key_is_scoped_to_route_and_body():
    trainer, _ = fake_pair("m", rank=4)

    async def main():
        async with _client(trainer.app) as c:
            await _result(c, await c.post("/init_trainer_server", json={"lora_rank": 4}))
            h = {"Idempotency-Key": "same"}
            r1 = await c.post("/forward", json={"data": [_datum()]}, headers=h)
            assert r1.status_code == 202
            assert (await c.post("/forward", json={"data": [_datum()]}, headers=h)).json() == r1.json()
            other_route = await c.post("/optim_step", json={"adam_params": {}}, headers=h)
            assert other_route.status_code == 409 and other_route.json()["error"]["field"] == "Idempotency-Key"
            other_body = await c.post("/forward", json={"data": [_datum((1, 2, 3))]}, headers=h)
            assert other_body.status_code == 409
            # a refused submit does not use up its key: the corrected request may reuse it
            h2 = {"Idempotency-Key": "fixed-later"}
            assert (await c.post("/forward", json={"data": []}, headers=h2)).status_code == 400
            assert (await c.post("/forward", json={"data": [_datum()]}, headers=h2)).status_code == 202

    _run(main())


def test_operation_store_has_a_byte_cap_oldest_evicted_first():
    async def main():
        q = OperationQueue(max_bytes=3000)

        async def big():
            return "x" * 1000

        ops = [q.submit("op", big, key=None, seq_id=None)[0] for _ in range(6)]
        for op in ops:
            await q.wait(op, 5)
        assert q.kept_bytes <= 3000
        assert q.get(ops[0].id) is None and q.get(ops[-1].id) is not None  # oldest went first
        q.close()

    _run(main())


def test_evicted_result_poll_is_404_unknown_operation():
    trainer, _ = fake_pair("m", rank=4)
    trainer.runs[trainer.run_id].queue_for(None).max_bytes = 1  # the default run's unordered stream

    async def main():
        async with _client(trainer.app) as c:
            r = await c.post("/init_trainer_server", json={"lora_rank": 4})
            op = r.json()["operation_id"]
            r2 = await c.post("/init_trainer_server", json={"lora_rank": 4})
            await _result(c, r2)
            assert (await c.get(f"/operations/{op}")).status_code == 404

    _run(main())


def test_shutdown_fails_queued_ops_with_503_and_finishes_the_running_one():
    trainer, _ = fake_pair("m", rank=4, poll_hold=0.05)
    slow = trainer.engine.init_lora

    def sleepy(*a):
        time.sleep(0.5)
        return slow(*a)

    trainer.engine.init_lora = sleepy

    async def main():
        async with _client(trainer.app) as c:
            running = (await c.post("/init_trainer_server", json={"lora_rank": 4})).json()["operation_id"]
            queued = [(await c.post("/init_trainer_server", json={"lora_rank": 4})).json()["operation_id"]
                      for _ in range(3)]
            await asyncio.sleep(0.1)
            find_guard(trainer.app).begin_shutdown()
            new = await c.post("/init_trainer_server", json={"lora_rank": 4})
            assert new.status_code == 503 and new.json()["details"]["reason"] == "SHUTTING_DOWN"
            for op in queued:
                r = await c.get(f"/operations/{op}")
                assert r.status_code == 503 and r.json()["error_class"] == "ServerShutdownError"
            wire = WireClient(Endpoint(url="http://t", transport=httpx.ASGITransport(app=trainer.app)))
            with pytest.raises(ServerShutdownError):  # what the loops client raises for a queued op
                await wire.poll(queued[0], what="init")
            await wire.aclose()
            r = await _result(c, httpx.Response(202, json={"operation_id": running}))
            assert r.status_code == 200 and r.json()["status"] == "done"
            await asyncio.wait_for(find_guard(trainer.app).drain(5), 5)
            assert not find_guard(trainer.app)._owed

    _run(main())


def test_sample_is_cancelled_when_its_client_disconnects():
    _, sampler = fake_pair("m", rank=4)
    started, cancelled = asyncio.Event(), []
    real = sampler.engine.generate

    async def slow_generate(req):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return await real(req)

    sampler.engine.generate = slow_generate

    async def main():
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}).encode()
        sent = False
        disconnect = asyncio.Event()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        out = []

        async def send(message):
            out.append(message)

        scope = {"type": "http", "method": "POST", "path": "/sample", "headers": [], "query_string": b"",
                 "root_path": "", "scheme": "http", "server": ("t", 80), "http_version": "1.1", "client": ("c", 1)}
        task = asyncio.create_task(sampler.app(scope, receive, send))
        await asyncio.wait_for(started.wait(), 5)
        disconnect.set()
        await asyncio.wait_for(task, 5)
        assert cancelled == [True] and not out

    _run(main())


def test_checkpoint_paths_never_leave_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPS_CHECKPOINT_ROOTS", raising=False)
    store = CheckpointStore(tmp_path / "runs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    for bad in ["loops://../weights/x", "loops://run/weights/..", str(outside), f"file://{outside}", "/etc",
                str(tmp_path / "runs" / ".." / "outside")]:
        with pytest.raises(InvalidRequestError):
            store.resolve(bad)
    with pytest.raises(InvalidRequestError):  # same answer whether the directory exists or not
        store.resolve(str(tmp_path / "nowhere"))
    for bad_id in ["../../etc/weights/x", "run/weights/..", "run/../x", ".."]:
        with pytest.raises((InvalidRequestError, NotFoundError)):
            store.get(bad_id)
    # a symlink inside the root pointing outside is not followed
    (tmp_path / "runs" / "r" / "sampler_weights").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "sampler_weights" / "ln").symlink_to(outside)
    with pytest.raises(InvalidRequestError):
        store.resolve("loops://r/sampler_weights/ln")
    with pytest.raises(InvalidRequestError):
        store.resolve(str(tmp_path / "runs" / "r" / "sampler_weights" / "ln"))
    # configured extra roots are allowed
    allowed = CheckpointStore(tmp_path / "runs", roots=[outside.resolve()])
    assert allowed.resolve(str(outside), kind="sampler_weights") == outside.resolve()


def test_checkpoint_file_listing_and_download_skip_symlinks(tmp_path, monkeypatch):
    from loops_core.download import download_files

    store = CheckpointStore(tmp_path / "runs")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")

    def write(d):
        (d / "adapter_config.json").write_text("{}")
        (d / "leak").symlink_to(secret)

    store.create("r", "sampler_weights", "c", base_model="m", lora_rank=4, write=write)
    files = store.files("r/sampler_weights/c")
    names = {f.relative_file_name for f in files.presigned_urls}
    assert "leak" not in names and "adapter_config.json" in names
    forged = files.presigned_urls[0].model_copy(update={"url": (store.root / "r/sampler_weights/c/leak").as_uri(),
                                                        "relative_file_name": "leak", "size_bytes": None})
    with pytest.raises(Exception, match="symbolic link"):
        asyncio.run(download_files([forged], tmp_path / "dl"))


def test_adhoc_adapters_are_keyed_by_resolved_path_and_lru_evicted(monkeypatch):
    from loops_backends.fake.engine import FakeSamplerEngine
    from loops_core.server.sampler import SamplerServer

    trainer, _ = fake_pair("m", rank=4)
    sampler = SamplerServer(FakeSamplerEngine("m"), store=trainer.store)  # loads them by path only
    find_guard(sampler.app).limits = Limits(max_adhoc_adapters=2)

    async def main():
        async with _client(trainer.app) as c, _client(sampler.app) as s:
            await _result(c, await c.post("/init_trainer_server", json={"lora_rank": 4}))
            paths = []
            for i in range(3):
                r = await _result(c, await c.post("/save_weights_for_sampler", json={"name": f"a{i}"}))
                paths.append(r.json()["result"]["path"])
            directory = trainer.store.resolve(paths[0], kind="sampler_weights")
            spellings = [str(directory), str(directory) + "/", str(directory / "." / ""), str(directory.parent / ".." /
                         directory.parent.name / directory.name)]
            for p in spellings:
                r = await s.post("/sample", json={"prompt": [1, 2], "max_tokens": 1},
                                 headers={"X-Checkpoint-Path": p})
                assert r.status_code == 200, r.text
            adhoc = [a for a in sampler.table.adapters.values() if a.policy_version is None]
            assert len(adhoc) == 1
            for p in paths[1:]:
                d = trainer.store.resolve(p, kind="sampler_weights")
                r = await s.post("/sample", json={"prompt": [1, 2], "max_tokens": 1},
                                 headers={"X-Checkpoint-Path": str(d)})
                assert r.status_code == 200, r.text
            adhoc = [a for a in sampler.table.adapters.values() if a.policy_version is None]
            assert len(adhoc) == 2 and str(directory) not in {a.path for a in adhoc}
            r = await s.post("/sample", json={"prompt": [1, 2]}, headers={"X-Checkpoint-Path": "/etc"})
            assert r.status_code == 400
            broken = trainer.store.root / "r" / "sampler_weights" / "broken"
            broken.mkdir(parents=True, exist_ok=True)
            (broken / "adapter_config.json").write_text("{}")
            r = await s.post("/sample", json={"prompt": [1, 2]}, headers={"X-Checkpoint-Path": str(broken)})
            assert r.status_code == 400 and r.json()["error"]["field"] == "X-Checkpoint-Path", r.text

    _run(main())


def test_publish_route_needs_the_trainers_token_when_configured():
    _, sampler = fake_pair("m", rank=4)
    sampler.publish_token = "t" * 24

    async def main():
        async with _client(sampler.app) as s:
            r = await s.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x",
                                                            "policy_version": 10**18})
            assert r.status_code in (400, 403)
            r = await s.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x", "policy_version": 5})
            assert r.status_code == 403
            assert (await s.get("/policy_version")).json()["policy_version"] == 0

    _run(main())


def test_one_log_line_per_request_with_status_duration_and_operation(caplog):
    trainer, _ = fake_pair("m", rank=4)

    async def main():
        async with _client(trainer.app) as c:
            r = await c.post("/init_trainer_server", json={"lora_rank": 4})
            await _result(c, r)
            return r.json()["operation_id"]

    with caplog.at_level(logging.INFO, logger="loops.server"):
        op = _run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "loops.server"]
    assert any(ln.startswith("POST /init_trainer_server 202 ") and f"op={op}" in ln and "ms" in ln for ln in lines)
    assert any(ln.startswith(f"GET /operations/{op} 200 ") for ln in lines)


def _serve(env_extra=None, args=()):
    env = {**os.environ, "LOOPS_DRAIN_S": "5", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--model", "m", "--engine", "fake",
                             "--trainer-port", "0", "--sampler-port", "0", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(proc.stderr.read())
    return proc, json.loads(line)["urls"]


def _big_batch():  # ~0.3 s of fake-engine work, so that one runs while others queue
    return {"data": [_datum(tuple(range(1, 200)))] * 64}


def test_sigterm_drains_running_fails_queued_refuses_new_then_exits():
    proc, urls = _serve()
    try:
        with httpx.Client(base_url=urls["trainer"], timeout=30) as c:
            c.post("/init_trainer_server", json={"lora_rank": 4})
            ops = [c.post(FB, json=_big_batch()).json()["operation_id"] for _ in range(4)]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert c.post(FB, json=_big_batch()).status_code == 503
            statuses = []
            for op in ops:
                while (r := c.get(f"/operations/{op}")).status_code == 408:
                    pass
                statuses.append(r.status_code)
            assert statuses[0] == 200 and 503 in statuses, statuses
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_key_rules_version_and_port_in_use(tmp_path):
    def run(*a, env=None):
        return subprocess.run([sys.executable, "-m", "loops_core.cli", *a], capture_output=True, text=True,
                              env={**os.environ, "LOOPS_API_KEY": "", **(env or {})}, timeout=60)

    assert run("--version").stdout.startswith("loops ")
    r = run("serve", "--model", "m", "--engine", "fake", "--api-key", "secret")
    assert r.returncode != 0 and "LOOPS_API_KEY" in r.stderr and "--api-key-file" in r.stderr
    r = run("serve-trainer", "--model", "m", "--engine", "fake", "--host", "0.0.0.0", env={"LOOPS_API_KEY": "short"})
    assert r.returncode != 0 and "16" in r.stderr
    keyfile = tmp_path / "key"
    keyfile.write_text("")
    r = run("serve-trainer", "--model", "m", "--engine", "fake", "--api-key-file", str(keyfile))
    assert r.returncode != 0 and "empty" in r.stderr
    proc, urls = _serve()
    try:
        port = urls["trainer"].rsplit(":", 1)[1]
        r = run("serve", "--model", "m", "--engine", "fake", "--trainer-port", port, "--sampler-port", "0")
        assert r.returncode != 0 and f"port {port}" in r.stderr and "--trainer-port" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        proc.terminate()
        proc.wait(15)


def test_api_key_file_is_read_and_enforced(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("k" * 20 + "\n")
    proc, urls = _serve(args=("--api-key-file", str(keyfile)), env_extra={"LOOPS_API_KEY": ""})
    try:
        assert httpx.get(urls["trainer"] + "/get_info").status_code == 401
        r = httpx.get(urls["trainer"] + "/get_info", headers={"Authorization": "Api-Key " + "k" * 20})
        assert r.status_code == 200 and r.headers["x-loops-incarnation"]
    finally:
        proc.terminate()
        proc.wait(15)
