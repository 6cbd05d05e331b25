"""The trainer and sampler servers over real HTTP and in-process: protocol details, ordering,
shutdown, version gating, auth, and binding with ServiceClient.local."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from loops_backends.fake.backend import fake_pair
from loops_core import AdamParams, InvalidRequestError, ModelInput, SamplingParams, ServerShutdownError, ServiceClient
from loops_core.errors import AuthenticationError
from loops_core.testing.contract.data import france, sft_datum


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_submit_poll_idempotency_and_long_poll_408():
    trainer, _ = fake_pair("m", rank=4, poll_hold=0.05)

    async def main():
        async with _client(trainer.app) as c:
            r = await c.post("/init_trainer_server", json={"lora_rank": 4, "seq_id": 1},
                             headers={"Idempotency-Key": "k1"})
            assert r.status_code == 202 and r.json() == {"operation_id": "k1", "schema_version": 1}
            again = await c.post("/init_trainer_server", json={"lora_rank": 4, "seq_id": 1},
                                 headers={"Idempotency-Key": "k1"})
            assert again.json()["operation_id"] == "k1"
            done = await c.get("/operations/k1")
            assert done.status_code == 200 and done.json()["status"] == "done"
            assert done.json()["result"] == {"step": 0, "lora_rank": 4}
            # a slow operation: the poll holds, then answers 408 so the client re-polls
            trainer.engine.optim_step = _slow(trainer.engine.optim_step, 0.5)
            r = await c.post("/optim_step", json={"adam_params": {}, "seq_id": 2})
            op = r.json()["operation_id"]
            assert (await c.get(f"/operations/{op}")).status_code == 408
            for _ in range(400):  # re-poll on 408, as clients do, until the operation is done
                r = await c.get(f"/operations/{op}")
                if r.status_code != 408:
                    break
            assert r.json()["status"] == "done"
            assert (await c.get("/operations/unknown")).status_code == 404

    asyncio.run(main())


def _slow(fn, seconds):
    def wrapped(*a, **kw):
        time.sleep(seconds)
        return fn(*a, **kw)

    return wrapped


def test_operations_run_in_seq_id_order_even_when_they_arrive_out_of_order():
    trainer, _ = fake_pair("m", rank=4)
    order = []
    orig = trainer.engine.init_lora

    def record(rank, seed):
        order.append(rank)
        return orig(rank, seed)

    trainer.engine.init_lora = record

    async def main():
        async with _client(trainer.app) as c:
            await c.post("/init_trainer_server", json={"lora_rank": 1, "seq_id": 1})
            await asyncio.sleep(0.1)
            ids = []
            for seq in (4, 3, 2):  # arrive backwards
                r = await c.post("/init_trainer_server", json={"lora_rank": seq, "seq_id": seq})
                ids.append(r.json()["operation_id"])
            for op in ids:
                assert (await c.get(f"/operations/{op}")).json()["status"] == "done"

    asyncio.run(main())
    assert order == [1, 2, 3, 4]


def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving():
    trainer, _ = fake_pair("m", rank=4)

    async def main():
        async with _client(trainer.app) as c:
            bad = await c.post("/forward_backward", content=b"{not json")
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "body"
            bad = await c.post("/forward_backward", json={"data": [{"model_input": {"chunks": []}}], "loss_fn": "x"})
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "loss_fn"
            bad = await c.post("/optim_step", json={"adam_params": {"beta1": 2.0}})
            assert bad.status_code == 400 and "beta1" in bad.json()["error"]["field"]
            ok = await c.get("/health")
            assert ok.status_code == 200

    asyncio.run(main())


def test_shutdown_answers_503_and_the_client_raises_server_shutdown():
    trainer, _ = fake_pair("m", rank=4)
    trainer.shutting_down = True

    async def main():
        async with _client(trainer.app) as c:
            return (await c.post("/optim_step", json={"adam_params": {}})).status_code

    assert asyncio.run(main()) == 503
    from loops_core.futures import run_sync
    from loops_core.wire import Endpoint, WireClient

    wire = WireClient(Endpoint(url="http://t", transport=httpx.ASGITransport(app=trainer.app)))
    with pytest.raises(ServerShutdownError):
        run_sync(wire.submit("/optim_step", {"adam_params": {}}, what="optim_step"))


def test_sampler_version_gate_and_exact_pins():
    trainer, sampler = fake_pair("m", rank=4)
    tok = list(b"abc")

    async def main():
        async with _client(trainer.app) as t, _client(sampler.app) as s:
            body = {"prompt": tok, "max_tokens": 2, "temperature": 0}
            base = await s.post("/sample", json=body)
            assert base.headers["x-trainers-policy-version"] == "0"
            gated = await s.post("/sample", json=body, headers={"X-Min-Policy-Version": "1"})
            assert gated.status_code == 408
            await t.post("/init_trainer_server", json={"lora_rank": 4})
            for v in (1, 2):
                r = await t.post("/save_weights_for_sampler", json={"name": f"v{v}"})
                assert (await t.get(f"/operations/{r.json()['operation_id']}")).json()["result"]["version"] == v
            live = await s.post("/sample", json=body, headers={"X-Min-Policy-Version": "1"})
            assert live.headers["x-trainers-policy-version"] == "2"
            pinned = await s.post("/sample", json=body, headers={"X-Policy-Version": "1"})
            assert pinned.headers["x-trainers-policy-version"] == "1"
            models = (await s.get("/v1/models")).json()["data"]
            assert models[0]["parent"] is None and models[1]["id"] == "v2" and models[1]["parent"] == "m"
            assert (await s.get("/trainers_policy_version")).json() == {"policy_version": 2}
            # a dropped version is gone for good: 410, not silently another version
            sampler.table.keep_versions, sampler.table.idle_unload_s = 1, 0.0
            r = await t.post("/save_weights_for_sampler", json={"name": "v3"})
            await t.get(f"/operations/{r.json()['operation_id']}")
            assert (await s.post("/sample", json=body, headers={"X-Policy-Version": "1"})).status_code == 410

    asyncio.run(main())


def test_api_key_required_off_loopback_and_enforced():
    r = subprocess.run([sys.executable, "-m", "loops_core.cli", "serve", "--model", "m", "--engine", "fake",
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LOOPS_API_KEY": ""})
    assert r.returncode != 0 and "API key" in (r.stderr + r.stdout)
    from loops_core.server.sampler import SamplerServer
    from loops_backends.fake.engine import FakeSamplerEngine

    app = SamplerServer(FakeSamplerEngine("m"), api_key="s3cret").app

    async def main():
        async with _client(app) as c:
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/v1/models")).status_code == 401
            ok = await c.get("/v1/models", headers={"Authorization": "Api-Key s3cret"})
            assert ok.status_code == 200

    asyncio.run(main())


@pytest.fixture
def served():
    """``loops serve --engine fake`` on real loopback sockets."""
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--model", "fake-model", "--engine",
                             "fake", "--trainer-port", "0", "--sampler-port", "0"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "LOOPS_API_KEY": "k"})
    urls = json.loads(proc.stdout.readline())["urls"]
    yield urls
    proc.terminate()
    proc.wait(10)


def test_service_client_local_binds_to_loops_serve(served):
    with pytest.raises(AuthenticationError):
        ServiceClient.local(trainer_url=served["trainer"], sampler_url=served["sampler"]).create_lora_training_client(
            "fake-model", rank=4)
    service = ServiceClient.local(trainer_url=served["trainer"], sampler_url=served["sampler"], api_key="k")
    assert service.session_id == "local"
    tc = service.create_lora_training_client("fake-model", rank=4, seed=0)
    datum = sft_datum(*france(tc.get_tokenizer()))
    losses = []
    for _ in range(5):
        losses.append(tc.forward_backward([datum]).result(timeout=60).loss)
        tc.optim_step(AdamParams(learning_rate=5e-2)).result(timeout=60)
    assert losses[-1] < losses[0]
    sc = tc.save_weights_and_get_sampling_client("served").result(timeout=60)
    out = sc.sample(ModelInput.from_ints([1, 2, 3]), 1, SamplingParams(max_tokens=3, temperature=0))
    assert out.policy_version == 1
    saved = tc.save_state("served-state").result(timeout=60)
    assert any(c.path == saved.path for c in service.list_checkpoints(tc.run_id))
    ckpt = next(c for c in tc.list_checkpoints() if c.path == saved.path)
    files = service.get_checkpoint_archive_url(ckpt.id)
    assert files.total_count > 0 and files.presigned_urls[0].url.startswith("file://")
    with pytest.raises(InvalidRequestError):
        tc.forward_backward([]).result()
    service.close()


def test_concurrent_requests_spread_over_several_http_clients():
    """A burst through one httpx pool costs O(N) Python per request in httpcore; WireClient gives
    each request in flight a client of its own and reuses the idle ones. A real loopback server
    answers /hold only once all ``n`` requests are in, so all of them are in flight at once."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from loops_core.server.run import Listener
    from loops_core.wire import Endpoint, WireClient

    n = 20
    arrived: list[int] = []
    all_in = asyncio.Event()

    async def hold(request):
        arrived.append(1)
        if len(arrived) == n:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 30)
        return JSONResponse({"ok": True})

    listener = Listener("hold", Starlette(routes=[Route("/hold", hold)]), "127.0.0.1")
    sock = listener.bind()
    server = uvicorn.Server(uvicorn.Config(listener.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        async def burst(wire: WireClient) -> None:
            for _ in range(2):  # the second burst reuses the first one's clients
                arrived.clear()
                all_in.clear()
                answers = await asyncio.gather(*(wire.get_json("/hold", what="hold") for _ in range(n)))
                assert answers == [{"ok": True}] * n
                assert len(wire._clients) == n and len(wire._idle) == n
            await wire.aclose()
            assert wire._clients == [] and wire._idle == []

        asyncio.run(burst(WireClient(Endpoint(listener.url))))
    finally:
        server.should_exit = True
        thread.join(10)

    # An injected transport (in-process servers, tests) has no pool to spread: one client.
    async def in_process() -> None:
        wire = WireClient(Endpoint("http://t", transport=httpx.MockTransport(lambda r: httpx.Response(200, json={}))))
        await asyncio.gather(*(wire.get_json("/x", what="x") for _ in range(n)))
        assert len(wire._clients) == 1
        await wire.aclose()

    asyncio.run(in_process())


# ---- many runs on one trainer -----------------------------------------------------------------

async def _done(c, r) -> dict:
    assert r.status_code == 202, r.text
    return (await c.get(f"/operations/{r.json()['operation_id']}")).json()


def test_runs_are_created_named_refused_and_closed_over_http():
    trainer, _ = fake_pair("m", rank=4, run_id="the-default")
    trainer.max_runs = 3  # the default run and two more

    async def main():
        async with _client(trainer.app) as c:
            a = (await c.post("/runs", json={"lora_rank": 2, "seed": 1, "base_model": "m"})).json()["run_id"]
            b = (await c.post("/runs", json={"lora_rank": 8})).json()["run_id"]
            full = await c.post("/runs", json={"lora_rank": 2})
            assert full.status_code == 503 and "maximum of 3 runs" in full.json()["detail"]
            other = await c.post("/runs", json={"lora_rank": 2, "base_model": "x/y"})
            assert other.status_code == 400 and "'x/y'" in other.json()["detail"] and "'m'" in other.json()["detail"]
            datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                     "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64", "shape": [2]}}}
            wrong = await c.post("/forward", json={"data": [datum], "model": "x/y", "run_id": a})
            assert wrong.status_code == 400 and wrong.json()["error"]["field"] == "model"
            unknown = await c.post("/optim_step", json={"adam_params": {}, "run_id": "nope"})
            assert unknown.status_code == 404 and "'nope'" in unknown.json()["detail"]
            assert (await c.get("/get_info", headers={"X-Run-Id": "nope"})).status_code == 404
            assert (await c.get("/get_info", headers={"X-Run-Id": b})).json()["lora_rank"] == 8
            assert (await c.get("/get_info")).json()["run_id"] == "the-default"  # no run named: the default
            # init_trainer_server resets only the caller's run
            await _done(c, await c.post("/optim_step", json={"adam_params": {}, "run_id": a}))
            await _done(c, await c.post("/optim_step", json={"adam_params": {}, "run_id": b}))
            await _done(c, await c.post("/init_trainer_server", json={"lora_rank": 4, "run_id": a}))
            steps = {r["run_id"]: r["step"] for r in (await c.get("/runs")).json()["runs"]}
            assert steps == {"the-default": 0, a: 0, b: 1}
            assert (await c.post("/close_run", json={"run_id": a})).json() == {"run_id": a, "closed": True}
            assert (await c.post("/forward", json={"data": [datum], "run_id": a})).status_code == 404
            assert (await c.post("/close_run", json={})).status_code == 400  # the default run stays
            assert (await c.post("/runs", json={"lora_rank": 2})).status_code == 200  # a's place is free again
        assert sorted(trainer.engine.runs) == sorted(["default", b, *[r for r in trainer.runs if r not in
                                                                      ("the-default", b)]])

    asyncio.run(main())


def test_two_clients_on_one_run_do_not_wait_on_the_gap_timer():
    """Each client counts seq_id from 1; interleaved, neither waits for the other's numbers."""
    trainer, _ = fake_pair("m", rank=4)

    async def main():
        async with _client(trainer.app) as c:
            t0 = time.monotonic()
            for seq_a, seq_b in [(1, None), (2, 1), (3, 2), (4, 3), (5, 4)]:
                for seq in (seq_a, seq_b):
                    if seq is not None:
                        await _done(c, await c.post("/optim_step", json={"adam_params": {}, "seq_id": seq}))
            return time.monotonic() - t0

    assert asyncio.run(main()) < 2.0  # one gap wait would be 5 s
    assert trainer.runs[trainer.run_id].step == 9


def test_runs_take_turns_on_the_engine():
    """A long queue of one run does not starve another: the engine worker serves runs first come,
    first served, one operation each at a time."""
    trainer, _ = fake_pair("m", rank=4)
    order = []
    step = trainer.engine.optim_step

    def recorded(params):
        order.append(trainer.engine._run)
        time.sleep(0.01)
        return step(params)

    trainer.engine.optim_step = recorded

    async def main():
        async with _client(trainer.app) as c:
            a = (await c.post("/runs", json={"lora_rank": 2})).json()["run_id"]
            b = (await c.post("/runs", json={"lora_rank": 2})).json()["run_id"]
            ops = [await c.post("/optim_step", json={"adam_params": {}, "run_id": a, "seq_id": i + 1})
                   for i in range(20)]
            await asyncio.sleep(0.03)
            ops.append(await c.post("/optim_step", json={"adam_params": {}, "run_id": b, "seq_id": 1}))
            for r in ops:
                assert (await _done(c, r))["status"] == "done"
            return a, b

    a, b = asyncio.run(main())
    assert len(order) == 21 and order.index(b) <= 8, order  # b's one op did not wait for a's twenty


def test_sampler_serves_every_run_pinned_and_keeps_few_resident():
    trainer, sampler = fake_pair("m", rank=4)
    sampler.table.max_resident = 2
    body = {"prompt": list(b"abc"), "max_tokens": 0, "prompt_logprobs": 0}

    async def main():
        async with _client(trainer.app) as t, _client(sampler.app) as s:
            runs = []
            for seed in (1, 2, 3):
                rid = (await t.post("/runs", json={"lora_rank": 4, "seed": seed})).json()["run_id"]
                for _ in range(2):  # two steps on a datum, so every run's adapter differs from the base
                    datum = sft_datum(list(b"abc"), list(b"d" * seed)).model_dump(mode="json")
                    await _done(t, await t.post("/forward_backward", json={"data": [datum], "run_id": rid}))
                    await _done(t, await t.post("/optim_step", json={"adam_params": {"learning_rate": 0.1},
                                                                     "run_id": rid}))
                v = (await _done(t, await t.post("/save_weights_for_sampler", json={"name": "v", "run_id": rid})))
                assert v["result"]["version"] == 1  # every run counts its own versions
                runs.append(rid)
            first = {}
            for rid in runs * 2:  # the second round reloads what the cap evicted: same numbers
                r = await s.post("/sample", json=body, headers={"X-Run-Id": rid, "X-Policy-Version": "1"})
                assert r.status_code == 200 and r.headers["x-trainers-policy-version"] == "1"
                assert len(sampler.table.resident) <= 2
                first.setdefault(rid, r.json()["prompt_logprobs"])
                assert r.json()["prompt_logprobs"] == first[rid]
            assert len({json.dumps(v) for v in first.values()}) == 3  # three runs, three adapters
            # the run can also come from the pinned checkpoint path (older clients send only that)
            path = {"X-Checkpoint-Path": f"loops://{runs[1]}/sampler_weights/v", "X-Policy-Version": "1"}
            assert (await s.post("/sample", json=body, headers=path)).json()["prompt_logprobs"] == first[runs[1]]
            missing = await s.post("/sample", json=body, headers={"X-Run-Id": runs[0], "X-Policy-Version": "2"})
            assert missing.status_code == 408  # not published yet, for this run

    asyncio.run(main())


def test_two_service_clients_on_one_loops_serve_do_not_reset_each_other(served):
    """The issue's scenario: A trains against ``loops serve``; B creates a client on the same servers."""
    a = ServiceClient.local(trainer_url=served["trainer"], sampler_url=served["sampler"], api_key="k")
    b = ServiceClient.local(trainer_url=served["trainer"], sampler_url=served["sampler"], api_key="k")
    tc_a = a.create_lora_training_client("fake-model", rank=4, seed=0)
    datum = sft_datum(*france(tc_a.get_tokenizer()))
    losses = []
    for _ in range(4):
        losses.append(tc_a.forward_backward([datum]).result(timeout=60).loss)
        tc_a.optim_step(AdamParams(learning_rate=5e-2)).result(timeout=60)
    tc_b = b.create_lora_training_client("fake-model", rank=16)
    assert tc_b.run_id != tc_a.run_id and tc_b.get_info().lora_rank == 16 and tc_a.get_info().lora_rank == 4
    after = tc_a.forward_backward([datum]).result(timeout=60).loss
    assert after < losses[-1] < losses[0]  # A went on from where it was
    with pytest.raises(InvalidRequestError, match="other/model"):
        b.create_lora_training_client("other/model", rank=4)
    a.close()
    b.close()


def test_top_k_logprobs_and_sampler_extras_over_http():
    trainer, sampler = fake_pair("m", rank=4)
    prompt = list(b"abcd")

    async def main():
        async with _client(trainer.app) as t, _client(sampler.app) as s:
            datum = sft_datum(prompt[:2], prompt[2:]).model_dump(mode="json")
            out = await _done(t, await t.post("/forward", json={"data": [datum], "top_k_logprobs": 3}))
            top = out["result"]["loss_fn_outputs"][0]
            assert top["topk_token_ids"]["shape"] == [3, 3] and top["topk_logprobs"]["dtype"] == "float32"
            bad = await t.post("/forward", json={"data": [datum], "top_k_logprobs": 21})
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "top_k_logprobs"
            targets = {"data": [prompt[1], -1, prompt[2], -1, prompt[3], -1], "dtype": "int64", "shape": [3, 2]}
            r = (await s.post("/sample", json={"prompt": prompt, "max_tokens": 2, "seed": 0, "prompt_logprobs": 0,
                                               "topk_sample_logprobs": 2, "target_prompt_logprobs": targets})).json()
            assert [row[0] for row in r["target_prompt_logprobs"]] == \
                [r["prompt_logprobs"][i][str(prompt[i])]["logprob"] for i in (1, 2, 3)]
            assert all(row[1] == 0.0 for row in r["target_prompt_logprobs"]) and r["prompt_cache_hit_tokens"] == 0
            seq_top = r["choices"][0]["logprobs"]["topk_logprobs"]
            assert len(seq_top) == 2 and all(len(pos) == 2 and len(pos[0]) == 2 for pos in seq_top)
            bad = await s.post("/sample", json={"prompt": prompt, "target_prompt_logprobs": [[1]]})
            assert bad.status_code == 400 and bad.json()["error"]["field"] == "target_prompt_logprobs"

    asyncio.run(main())


def test_a_load_that_names_no_run_is_filed_under_the_run_its_path_belongs_to():
    """A replayed publication (Modal's journal records name, path and version only) lands in the run
    whose directory it is, so the run's pinned clients find it after a sampler restart."""
    trainer, sampler = fake_pair("m", rank=4)

    async def main():
        async with _client(trainer.app) as t:
            rid = (await t.post("/runs", json={"lora_rank": 4})).json()["run_id"]
            out = await _done(t, await t.post("/save_weights_for_sampler", json={"name": "v", "run_id": rid}))
        fresh = type(sampler)(sampler.engine, store=sampler.store)
        directory = sampler.store.dir_for(rid, "sampler_weights", "v")
        async with _client(fresh.app) as s:
            r = await s.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(directory),
                                                             "policy_version": 1})
            assert r.json()["run_id"] == rid
            pinned = {"X-Checkpoint-Path": out["result"]["path"], "X-Policy-Version": "1"}
            assert (await s.post("/sample", json={"prompt": [1, 2], "max_tokens": 1}, headers=pinned)).status_code == 200
            # one run published, none declared default: a request naming no run follows it
            plain = await s.post("/sample", json={"prompt": [1, 2], "max_tokens": 1})
            assert plain.headers["x-trainers-policy-version"] == "1"

    asyncio.run(main())
