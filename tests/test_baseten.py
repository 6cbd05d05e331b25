"""The baseten backend against its control-plane emulator (loopback only), and its pieces alone.

One emulator (fake engine) serves the module; faults are reset around every test. Timers are
shortened through the backend's options (``ready_poll_s``, ``retry_backoff_s``, ``heartbeat_s``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loops_core import (AdamParams, APIConnectionError, APIError, APIStatusError, APITimeoutError, AuthenticationError,
                        ConfigurationError, InvalidRequestError, LoopsError, ModelInput, NotFoundError, SamplingParams, ServerShutdownError,
                        ServiceClient)
from loops_core.backend import BackendConfig
from loops_core.futures import run_sync
from loops_core.testing.contract.data import france, sft_datum
from loops_core.types import CheckpointDownload
from loops_core.wire import Endpoint, WireClient
from loops_backends.baseten.backend import BasetenBackend, BasetenSettings
from loops_backends.baseten.control_plane import ControlPlane, DeploymentFailedError, control_plane_policy
from loops_backends.baseten.emulator import Emulator
from loops_backends.baseten.models import RunEnvelope, SamplerRecord
from loops_backends.baseten.readiness import Heartbeat, wait_for_sampler

KEY = "bt-key-MUST-NOT-LEAK-7f3a9c"  # recognisable, so a leak is easy to find
MODEL = "loops/tiny-qwen3"
FAST = {"ready_poll_s": 0.01, "retry_backoff_s": 0.005, "heartbeat_s": 3600.0}
LR = AdamParams(learning_rate=2e-2)


@pytest.fixture(scope="module")
def emu():
    with Emulator(api_key=KEY).running() as e:
        yield e


@pytest.fixture(autouse=True)
def _clean_faults(request):
    if "emu" in request.fixturenames:
        e = request.getfixturevalue("emu")
        e.faults.reset()
        yield
        e.faults.reset()
        e.url_ttl_s = 3600.0
    else:
        yield


def client(emu: Emulator, *args, **kw) -> ServiceClient:
    return ServiceClient(*args, backend="baseten", api_key=kw.pop("api_key", KEY), base_url=emu.url, **{**FAST, **kw})


def requests_to(emu: Emulator, method: str, path: str) -> list[dict]:
    return [r for r in emu.requests if r["method"] == method and r["path"] == path]


def trainer_dep(emu: Emulator, run_id: str):
    return emu.deployments[emu.runs[run_id]["trainer"]]


def datum(tc):
    return sft_datum(*france(tc.get_tokenizer()))


# ---- provisioning, headers, the same clients ---------------------------------------------------
def test_requests_carry_baseten_headers_and_fields(emu):
    before = len(emu.requests)
    with client(emu, "proj-42") as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4, seed=7)
        new = list(emu.requests)[before:]
        session = next(r for r in new if r["path"] == "/v1/loops/sessions")
        assert session["auth_scheme"] == "Api-Key" and session["x-baseten-accept-error"] == "1"
        assert session["user-agent"].startswith("loops/") and session["body"] == {"training_project_id": "proj-42"}
        trainer = next(r for r in new if r["path"] == "/v1/loops/trainers")["body"]
        assert trainer == {"session_id": sc.session_id, "base_model": MODEL, "lora_rank": 4, "replicas": 1,
                           "availability_model": "dedicated", "seed": 7, "training_project_id": "proj-42"}
        paired = next(r for r in new if r["path"] == "/v1/loops/samplers")["body"]
        assert paired == {"session_id": sc.session_id, "run_id": tc.run_id}
        # trainer and paired sampler: X-Run-Id; never X-Sampler-Id
        assert tc._endpoint.headers["X-Run-Id"] == tc.run_id and "X-Sampler-Id" not in tc._endpoint.headers
        assert tc._sampler.headers["X-Run-Id"] == tc.run_id and "X-Sampler-Id" not in tc._sampler.headers
        gw = [r for r in emu.requests if r["path"].startswith(f"/gw/{trainer_dep(emu, tc.run_id).id}/")]
        assert gw and all(r["x-run-id"] == tc.run_id and r["x-sampler-id"] is None for r in gw)
        assert all(r["auth_scheme"] == "Api-Key" for r in gw)
        # a standalone sampler: X-Sampler-Id instead
        sampler = sc.create_sampling_client(base_model=MODEL)
        assert "X-Sampler-Id" in sampler._endpoint.headers and "X-Run-Id" not in sampler._endpoint.headers
        out = sampler.sample(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=3, seed=1))
        assert len(out.sequences) == 2
        assert sc.get_server_capabilities().supported_models[0].model_name == MODEL


def test_train_publish_sample_and_bt_paths(emu):
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4, seed=1)
        d = datum(tc)
        losses = []
        for _ in range(3):
            losses.append(tc.forward_backward([d]).result().loss)
            tc.optim_step(LR).result()
        assert losses[-1] < losses[0]
        pinned = tc.save_weights_and_get_sampling_client("pub").result()
        assert pinned.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)).policy_version == 1
        tc.save_state("st").result()
        tc.load_state(f"bt://loops:{tc.run_id}/weights/st").result()  # the Baseten path form
        by_path = sc.create_sampling_client(model_path=f"bt://loops:{tc.run_id}/sampler_weights/pub")
        assert len(by_path.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)).sequences) == 1
        with pytest.raises(NotFoundError):
            sc.create_sampling_client(model_path=f"bt://loops:{tc.run_id}/sampler_weights/missing")


# ---- checkpoints: listing, every page, download ------------------------------------------------
def test_checkpoint_listing_pages_and_download(emu, tmp_path):
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4, seed=1)
        tc.save_state("dl").result()
        ckpt = next(c for c in sc.list_checkpoints(tc.run_id) if c.checkpoint_id == "dl")
        backend: BasetenBackend = sc.backend
        first = sc.get_checkpoint_archive_url(ckpt.id, page_size=1)
        assert len(first.presigned_urls) == 1 and first.next_page_token == 1 and first.total_count >= 2
        pages_before = len([r for r in emu.requests if r["path"].endswith("/files")])
        files = run_sync(backend.list_checkpoint_files(ckpt.id, page_size=1))
        assert len(files) == first.total_count  # every page, not just the first
        assert len([r for r in emu.requests if r["path"].endswith("/files")]) - pages_before == first.total_count
        assert all("signature=" in f.url and "expires=" in f.url for f in files)

        out = backend.download_checkpoint_sync(f"bt://loops:{tc.run_id}/weights/dl", tmp_path / "a")
        assert isinstance(out, CheckpointDownload) and out.file_count == len(files)
        src = emu.store.get(ckpt.id)[1]
        for f in files:
            assert (tmp_path / "a" / f.relative_file_name).read_bytes() == (src / f.relative_file_name).read_bytes()
        assert out.bytes_written == sum(f.size_bytes for f in files)
        assert not list((tmp_path / "a").glob("*.part"))
        again = asyncio.run(backend.download_checkpoint(ckpt.id, tmp_path / "b"))
        assert again.file_count == out.file_count

        with pytest.raises(InvalidRequestError) as info:  # a non-empty destination is refused
            backend.download_checkpoint_sync(ckpt.id, tmp_path / "a")
        assert info.value.field == "dest_dir"
        emu.faults.update(short_files=True)
        with pytest.raises(APIError, match="bytes"):
            backend.download_checkpoint_sync(ckpt.id, tmp_path / "c")
        assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()], "partial files are removed"
        emu.faults.update(short_files=False)
        emu.url_ttl_s = -5  # presigned URLs born expired
        with pytest.raises(APIStatusError, match="expired"):
            backend.download_checkpoint_sync(ckpt.id, tmp_path / "d")
        with pytest.raises(NotFoundError):
            sc.get_checkpoint_archive_url(f"{tc.run_id}/weights/nope")


def test_all_pages_helper_follows_tokens_and_refuses_a_stuck_one():
    pages = {0: 2, 2: 4, 4: None}

    def handler(request: httpx.Request) -> httpx.Response:
        token = int(request.url.params["page_token"])
        nxt = pages[token] if pages.get("stuck") is None else token
        files = [{"url": f"http://s/{token + i}", "relative_file_name": f"f{token + i}", "size_bytes": 1,
                  "last_modified": "x"} for i in range(2)]
        return httpx.Response(200, json={"presigned_urls": files, "next_page_token": nxt, "total_count": 6,
                                         "unknown_field": True})

    cp = ControlPlane("http://cp", KEY, transport=httpx.MockTransport(handler))
    files = run_sync(cp.all_checkpoint_files("c", page_size=2))
    assert [f.relative_file_name for f in files] == [f"f{i}" for i in range(6)]
    pages["stuck"] = True
    with pytest.raises(APIStatusError, match="did not advance"):
        run_sync(cp.all_checkpoint_files("c", page_size=2))
    run_sync(cp.aclose())


def test_response_models_ignore_unknown_fields():
    env = RunEnvelope.model_validate({"run": {"id": "r", "base_url": "http://x", "deployment_id": None,
                                              "brand_new": {"a": 1}}, "also_new": 2})
    assert env.run.id == "r" and env.run.deployment_id is None


# ---- faults --------------------------------------------------------------------------------------
def test_slow_provisioning_is_waited_out(emu):
    emu.faults.update(provisioning_polls=4)
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4)
        dep = trainer_dep(emu, tc.run_id)
        assert dep.status_polls >= 4  # BUILDING, BUILDING, DEPLOYING, DEPLOYING (then ACTIVE)
        health = requests_to(emu, "GET", f"/gw/{dep.id}/sync/health")
        assert len(health) >= 2 and dep.health_hits == 1  # 502 from the gateway until ACTIVE
        assert tc.forward_backward([datum(tc)]).result().loss > 0
        tc.save_weights_and_get_sampling_client("after-slow").result(timeout=60)  # the sampler, at first use
        assert emu.deployments[emu.runs[tc.run_id]["sampler"]].status_polls >= 4
        emu.faults.update(provisioning_polls=10_000)
        with pytest.raises(APITimeoutError, match="not ready within"):
            sc.create_lora_training_client(MODEL, rank=4, ready_timeout=0.3)


def test_sampler_scaled_to_zero_is_woken(emu):
    emu.faults.update(scaled_to_zero=True)
    with client(emu) as sc:
        sampler = sc.create_sampling_client(base_model=MODEL)
        dep = emu.deployments[next(d.id for d in emu.deployments.values() if d.sampler_id == sampler.sampler_id)]
        assert len(requests_to(emu, "POST", f"/gw/{dep.id}/wake")) == 1
        assert sampler.sample(ModelInput.from_ints([3, 4]), 1, SamplingParams(max_tokens=2)).sequences


def test_trainer_answering_503_is_server_shutdown(emu):
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4)
        emu.set_deployment(trainer_dep(emu, tc.run_id).id, shutting_down=True)
        with pytest.raises(ServerShutdownError):
            tc.forward_backward([datum(tc)]).result()
        with pytest.raises(ServerShutdownError):
            tc.health()


@pytest.mark.parametrize("status,words", [("FAILED", "failed"), ("STOPPED", "stopped"),
                                          ("PREEMPTED", "preempted")])
def test_terminal_trainer_deployments_fail_clearly(emu, status, words):
    emu.faults.update(fail_trainers=status, provisioning_polls=1)
    with client(emu) as sc:
        with pytest.raises(DeploymentFailedError) as info:
            sc.create_lora_training_client(MODEL, rank=4)
    assert info.value.status == status and words in str(info.value) and info.value.deployment_id in str(info.value)
    if status == "PREEMPTED":
        assert "spot" in str(info.value) and "dedicated" in str(info.value)


def test_terminal_sampler_deployment_fails_clearly(emu):
    emu.faults.update(fail_samplers="DEPLOY_FAILED")
    with client(emu) as sc:
        with pytest.raises(DeploymentFailedError, match="DEPLOY_FAILED"):
            sc.create_sampling_client(base_model=MODEL)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_transient_control_plane_burst_is_retried(emu, status):
    emu.faults.update(burst_count=3, burst_status=status)
    n = len(requests_to(emu, "POST", "/v1/loops/sessions"))
    with client(emu) as sc:
        assert sc.session_id
    assert len(requests_to(emu, "POST", "/v1/loops/sessions")) - n == 4


def test_control_plane_bursts_beyond_the_budget_fail_clearly(emu):
    emu.faults.update(burst_count=10, burst_status=500)
    n = len(requests_to(emu, "POST", "/v1/loops/sessions"))
    with pytest.raises(APIStatusError) as info:
        client(emu)
    assert info.value.status_code == 500 and "HTTP 500 (1 attempt)" in str(info.value)
    assert len(requests_to(emu, "POST", "/v1/loops/sessions")) - n == 1  # CONTROL_PLANE: a 500 is final
    emu.faults.update(burst_count=1000, burst_status=502)
    n = len(requests_to(emu, "POST", "/v1/loops/sessions"))
    started = time.monotonic()
    with pytest.raises(APIStatusError, match=r"HTTP 502 \(\d+ attempts\); giving up"):
        client(emu, retry_budget_s=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert 2 < len(requests_to(emu, "POST", "/v1/loops/sessions")) - n < 1000
    emu.faults.update(burst_count=5, burst_status=502)
    n = len(requests_to(emu, "POST", "/v1/loops/sessions"))
    with pytest.raises(APIStatusError, match=r"HTTP 502 \(1 attempt\)"):
        client(emu, retry_budget_s=0)
    assert len(requests_to(emu, "POST", "/v1/loops/sessions")) - n == 1


# ---- errors and secrets --------------------------------------------------------------------------
def test_missing_and_wrong_keys(emu, monkeypatch):
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="BASETEN_API_KEY"):
        ServiceClient(backend="baseten", base_url=emu.url)
    with pytest.raises(AuthenticationError, match="BASETEN_API_KEY") as info:
        client(emu, api_key="not-the-key")
    assert "403" in str(info.value)
    with httpx.Client(base_url=emu.url) as raw:
        assert raw.post("/v1/loops/sessions").status_code == 401
        assert raw.post("/v1/loops/sessions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        assert raw.post("/v1/loops/sessions", headers={"Authorization": "Api-Key nope"}).status_code == 403
        gw = raw.get("/gw/anything/sync/health")
        assert gw.status_code == 401 and gw.headers["X-Baseten-Error-Source"] == "06"
        both = raw.get(f"/gw/{next(iter(emu.deployments))}/sync/health",
                       headers={"Authorization": f"Api-Key {KEY}", "X-Run-Id": "a", "X-Sampler-Id": "b"})
        assert both.status_code == 400 and both.headers["X-Baseten-Error-Source"] == "06"


def test_unreachable_base_url_names_loops_base_url():
    from loops_backends.local_gpu.backend import free_port

    with pytest.raises(APIConnectionError, match="LOOPS_BASE_URL"):
        ServiceClient(backend="baseten", api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}",
                      retry_budget_s=0.05, retry_backoff_s=0.001)


def test_settings_are_read_when_the_backend_is_built(monkeypatch):
    monkeypatch.setenv("BASETEN_API_KEY", KEY)
    monkeypatch.delenv("LOOPS_BASE_URL", raising=False)
    assert BasetenBackend(BackendConfig()).base_url == "https://api.baseten.co"
    monkeypatch.setenv("LOOPS_BASE_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("LOOPS_HEARTBEAT_S", "7")
    monkeypatch.setenv("LOOPS_AVAILABILITY_MODEL", "spot")
    b = BasetenBackend(BackendConfig())
    assert (b.base_url, b.heartbeat_s, b.availability_model) == ("http://127.0.0.1:1", 7.0, "spot")
    b = BasetenBackend(BackendConfig(api_key="other", base_url="http://h", options={"heartbeat_s": 2}))
    assert (b.base_url, b.heartbeat_s, b.control._api_key) == ("http://h", 2.0, "other")
    with pytest.raises(ConfigurationError, match="heartbeat_seconds"):
        BasetenBackend(BackendConfig(options={"heartbeat_seconds": 1}))
    with pytest.raises(ConfigurationError, match="availability_model"):
        BasetenBackend(BackendConfig(options={"availability_model": "cheap"}))
    with pytest.raises(ConfigurationError, match="replicas"):
        BasetenBackend(BackendConfig(options={"replicas": 0}))
    monkeypatch.setenv("LOOPS_RETRY_BUDGET_S", "-1")
    with pytest.raises(ConfigurationError, match="LOOPS_RETRY_BUDGET_S"):
        BasetenBackend(BackendConfig())
    monkeypatch.setenv("LOOPS_RETRY_BUDGET_S", "5")
    monkeypatch.setenv("LOOPS_REUSE_FROM_RUN_ID", "run-x")
    b = BasetenBackend(BackendConfig(options={"retry_budget_s": 2, "retry_backoff_s": 0.1, "replicas": 3}))
    assert (b.control.retry_budget_s, b.control.policy.initial, b.replicas, b.reuse_from_run_id) == \
        (2.0, 0.1, 3, "run-x")
    assert BasetenBackend(BackendConfig()).control.retry_budget_s == 5.0
    assert all(f.description for f in BasetenSettings.model_fields.values())
    assert KEY not in repr(b.settings)  # SecretStr


def test_the_api_key_never_leaks(emu, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    wrong = "bt-wrong-key-ALSO-SECRET-d41d8"
    errors: list[BaseException] = []

    def expect(fn, exc=LoopsError):
        with pytest.raises(exc) as info:
            fn()
        errors.append(info.value)

    expect(lambda: client(emu, api_key=wrong), AuthenticationError)
    from loops_backends.local_gpu.backend import free_port
    expect(lambda: ServiceClient(backend="baseten", api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}",
                                 retry_budget_s=0), APIConnectionError)
    emu.faults.update(burst_count=5, burst_status=500)
    expect(lambda: client(emu), APIStatusError)
    emu.faults.update(burst_count=0, fail_trainers="PREEMPTED")
    sc = client(emu)
    expect(lambda: sc.create_lora_training_client(MODEL, rank=4), DeploymentFailedError)
    emu.faults.update(fail_trainers=None)
    tc = sc.create_lora_training_client(MODEL, rank=4)
    tc.save_state("k").result()
    expect(lambda: sc.get_checkpoint_archive_url(f"{tc.run_id}/weights/none"), NotFoundError)
    expect(lambda: sc.create_sampling_client(model_path="bt://loops:no-run/sampler_weights/x"), NotFoundError)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    expect(lambda: sc.backend.download_checkpoint_sync(f"{tc.run_id}/weights/k", tmp_path / "full"))
    emu.url_ttl_s = -1
    expect(lambda: sc.backend.download_checkpoint_sync(f"{tc.run_id}/weights/k", tmp_path / "e"))
    emu.set_deployment(trainer_dep(emu, tc.run_id).id, shutting_down=True)
    expect(lambda: tc.forward_backward([datum(tc)]).result(), ServerShutdownError)

    # a server that echoes the key back gets it scrubbed
    echo = httpx.MockTransport(lambda r: httpx.Response(400, json={"detail": f"bad: {r.headers['authorization']}"}))
    cp = ControlPlane("http://cp", KEY, transport=echo)
    expect(lambda: run_sync(cp.create_session()), InvalidRequestError)
    run_sync(cp.aclose())

    texts = [caplog.text, repr(sc.backend), repr(sc.backend.config), repr(sc.backend.control), repr(sc),
             repr(tc), repr(tc._endpoint), repr(tc._sampler), repr(emu.faults)]
    for exc in errors:
        seen = set()
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            texts += [str(exc), repr(exc), *map(str, exc.args)]
            exc = exc.__cause__ or exc.__context__
    texts += [r.getMessage() for r in caplog.records]
    for secret in (KEY, wrong):
        assert not [t for t in texts if secret in t], f"{secret} leaked"
    sc.close()


# ---- reuse ---------------------------------------------------------------------------------------
def test_reuse_from_session_is_best_effort(emu, monkeypatch):
    first = client(emu)
    tc1 = first.create_lora_training_client(MODEL, rank=4)
    with client(emu, reuse_from_session_id=first.session_id) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4)
        assert tc.run_id == tc1.run_id
        assert requests_to(emu, "POST", "/v1/loops/trainers")[-1]["body"]["reuse_from_session_id"] == first.session_id
        tc.forward_backward([datum(tc)]).result()
    monkeypatch.setenv("LOOPS_REUSE_FROM_SESSION_ID", first.session_id)
    with client(emu) as sc:
        assert sc.create_lora_training_client(MODEL, rank=4).run_id == tc1.run_id
    with client(emu, reuse_from_run_id=tc1.run_id) as sc:
        assert sc.create_lora_training_client(MODEL, rank=4).run_id == tc1.run_id
    emu.set_deployment(trainer_dep(emu, tc1.run_id).id, status="STOPPED")  # the warm trainer died
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4)
        assert tc.run_id != tc1.run_id
        assert tc.forward_backward([datum(tc)]).result().loss > 0
    monkeypatch.setenv("LOOPS_REUSE_FROM_SESSION_ID", "sess-never-existed")
    with client(emu) as sc:
        assert sc.create_lora_training_client(MODEL, rank=4).run_id
    first.close()


# ---- heartbeat -----------------------------------------------------------------------------------
def test_heartbeat_calls_health_until_the_session_closes(emu):
    sc = client(emu, heartbeat_s=0.05)
    tc = sc.create_lora_training_client(MODEL, rank=4)
    dep = trainer_dep(emu, tc.run_id)
    assert dep.wait_for_hits(dep.health_hits + 3), "three heartbeats"
    beats = [r for r in requests_to(emu, "GET", f"/gw/{dep.id}/sync/health") if "base_model=" in r["query"]]
    assert beats and all(r["x-run-id"] == tc.run_id for r in beats)
    tasks = [b._task for b in sc.backend.heartbeats]
    sc.close()
    assert tasks and all(t is None or t.done() for t in tasks), "close() ends the heartbeat tasks"
    assert sc.backend.heartbeats == []


def test_closing_a_training_client_stops_only_its_heartbeat(emu):
    sc = client(emu, heartbeat_s=0.05)
    a = sc.create_lora_training_client(MODEL, rank=4)
    b = sc.create_lora_training_client(MODEL, rank=4)
    dep_a, dep_b = trainer_dep(emu, a.run_id), trainer_dep(emu, b.run_id)
    sampler = a.save_weights_and_get_sampling_client("still-here").result(timeout=60)
    a.close()
    stopped = dep_a.health_hits
    # b's heartbeat is the clock: three of its beats go by, and a's trainer hears nothing more
    # (at most one beat already on the wire when a closed).
    assert dep_b.wait_for_hits(dep_b.health_hits + 3), "the other trainer keeps its heartbeat"
    assert dep_a.health_hits <= stopped + 1, "a closed client's trainer may scale down"
    assert sampler.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=1)).sequences
    sc.close()


def test_heartbeat_failure_policy(caplog):
    statuses: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["base_model"] == MODEL
        return httpx.Response(statuses.pop(0) if statuses else 500)

    async def run() -> Heartbeat:
        wire = WireClient(Endpoint(url="http://trainer", transport=httpx.MockTransport(handler)), ready_timeout=0)
        beat = Heartbeat(wire, base_model=MODEL, run_id="r", interval=0.0)
        statuses.extend([404, 401, 429] + [500] * 4 + [200])
        for _ in range(8):
            assert await beat.beat()
        assert beat.failures == 0 and beat.beats == 1  # 4xx ignored; a success resets the count
        assert "consecutive" not in caplog.text
        beat.start()  # now every answer is 500
        await asyncio.wait_for(beat._task, 5)
        assert beat.gave_up and beat.failures == 20
        await beat.stop()
        return beat

    caplog.set_level(logging.WARNING, logger="loops.baseten")
    asyncio.run(run())
    warnings = [r for r in caplog.records if "5 consecutive failures" in r.getMessage()]
    assert len(warnings) == 1 and "giving up after 20" in caplog.text


def test_sampler_gate_turns_off_on_a_4xx_status(caplog):
    cp = ControlPlane("http://cp", KEY, transport=httpx.MockTransport(lambda r: httpx.Response(403)))
    record = SamplerRecord(id="s", base_url="http://x/sync", model_id="m", deployment_id="d")
    caplog.set_level(logging.WARNING, logger="loops.baseten")
    asyncio.run(wait_for_sampler(cp, record, ready_timeout=1))
    assert "not waiting" in caplog.text


# ---- the emulator itself -------------------------------------------------------------------------
def test_admin_routes(emu):
    h = {"Authorization": f"Api-Key {KEY}"}
    with httpx.Client(base_url=emu.url, headers=h) as raw:
        assert raw.post("/_emulator/faults", json={"burst_count": 1, "burst_status": 503}).status_code == 200
        assert raw.get("/v1/loops/capabilities").status_code == 503
        assert raw.get("/v1/loops/capabilities").status_code == 200
        assert raw.post("/_emulator/faults", json={"no_such_fault": 1}).status_code == 400
        dep = next(iter(emu.deployments))
        assert raw.post(f"/_emulator/deployments/{dep}", json={"status": "PREEMPTED"}).json()["status"] == "PREEMPTED"
        assert raw.get(f"/v1/loops/deployments/{dep}").json()["deployment"]["status"]["name"] == "PREEMPTED"
        assert raw.post(f"/_emulator/deployments/{dep}", json={"status": "ACTIVE"}).status_code == 200
        state = raw.get("/_emulator/state").json()
        assert {"sessions", "runs", "deployments", "faults"} <= set(state)


def test_local_engine_spawns_server_processes():
    from loops_backends.local_gpu import backend as local

    with Emulator(api_key=KEY, engine="local", server_engine="fake").running() as emu:
        with client(emu, ready_poll_s=0.05) as sc:
            tc = sc.create_lora_training_client(MODEL, rank=4, seed=3)
            tc.forward_backward([datum(tc)]).result()
            tc.optim_step(LR).result()
            sampler = tc.save_weights_and_get_sampling_client("local").result()
            assert sampler.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)).policy_version == 1
            assert trainer_dep(emu, tc.run_id).status_polls >= 1
        procs = [p for p in local._LIVE if "emulator-" in p.log.name]
        assert len(procs) >= 2 and all(p.proc.poll() is None for p in procs)
    assert all(p.proc.poll() is not None for p in procs), "the emulator stops its subprocesses"


def test_cli_emulator_prints_what_to_export():
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "emulate", "baseten", "--port", "0",
                             "--engine", "fake"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "LOOPS_EMULATOR_API_KEY": KEY})
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("export BASETEN_API_KEY") or not line:
                break
        exports = dict(ln[len("export "):].strip().split("=", 1) for ln in lines if ln.startswith("export "))
        assert exports["LOOPS_BACKEND"] == "baseten" and exports["BASETEN_API_KEY"] == KEY
        r = httpx.post(f"{exports['LOOPS_BASE_URL']}/v1/loops/sessions", headers={"Authorization": f"Api-Key {KEY}"})
        assert r.status_code == 200 and r.json()["session"]["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    from loops_backends.baseten.emulator import cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["--help"])
    assert info.value.code == 0


def test_contract_environment_sets_and_restores_env(monkeypatch):
    monkeypatch.setenv("LOOPS_BASE_URL", "http://before")
    monkeypatch.delenv("BASETEN_API_KEY", raising=False)
    with BasetenBackend.contract_environment():
        assert os.environ["LOOPS_BASE_URL"].startswith("http://127.0.0.1:") and os.environ["BASETEN_API_KEY"]
        with ServiceClient(backend="baseten", **FAST) as sc:
            assert sc.session_id
    assert os.environ["LOOPS_BASE_URL"] == "http://before" and "BASETEN_API_KEY" not in os.environ


def test_control_plane_policy_scales_the_shared_one():
    from loops_core.retry import CONTROL_PLANE

    assert control_plane_policy() is CONTROL_PLANE
    fast = control_plane_policy(0.01)
    assert (fast.initial, fast.max_wait, fast.statuses) == (0.01, 0.16, CONTROL_PLANE.statuses)


def test_control_plane_retries_under_the_shared_policy():
    """429 with Retry-After, 502/503/504 retried; a POST that may have arrived is not resent."""
    answers = iter([httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(503), httpx.Response(200, json={})])
    seen = []

    def handler(r):
        seen.append(r.method)
        return next(answers)

    cp = ControlPlane("http://cp", KEY, policy=control_plane_policy(0.001), transport=httpx.MockTransport(handler))
    assert run_sync(cp.request("GET", "http://cp/x", what="x")).status_code == 200 and len(seen) == 3
    run_sync(cp.aclose())

    def read_timeout(r):
        seen.append(r.method)
        raise httpx.ReadTimeout("slow", request=r)

    for method, tries in (("POST", 1), ("GET", None)):
        seen.clear()
        cp = ControlPlane("http://cp", KEY, policy=control_plane_policy(0.001), retry_budget_s=0.2,
                          transport=httpx.MockTransport(read_timeout))
        with pytest.raises(APITimeoutError, match="LOOPS_BASE_URL"):
            run_sync(cp.request(method, "http://cp/x", what="x"))
        run_sync(cp.aclose())
        assert len(seen) == 1 if tries == 1 else len(seen) > 1


def test_wake_posts_next_to_sync():
    seen = []
    cp = ControlPlane("http://cp", KEY, transport=httpx.MockTransport(
        lambda r: (seen.append((r.method, str(r.url), r.headers["authorization"])), httpx.Response(202))[1]))
    run_sync(cp.wake("http://model-x.example/deployment/d/sync/"))
    run_sync(cp.aclose())
    assert seen == [("POST", "http://model-x.example/deployment/d/wake", f"Api-Key {KEY}")]


def test_serverless_sampler_queue_through_loops_client(emu):
    """loops' own client against the emulator's serverless sampler: /sample answers 202 with an
    operation, the client polls it, sends ``model`` (and ``lora`` when pinned) only there."""
    emu.faults.serverless_samplers = True
    with client(emu) as sc:
        sampler = sc.create_sampling_client(base_model=MODEL)
        assert sampler.endpoint.queued
        out = sampler.sample(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=3, seed=1))
        assert len(out.sequences) == 2 and all(1 <= len(s.tokens) <= 3 for s in out.sequences)
        bodies = [r for r in emu.requests if r["method"] == "POST" and r["path"].endswith("/sample")]
        assert bodies and bodies[-1].get("body", {}).get("model") == MODEL
        assert sampler.compute_logprobs(ModelInput.from_ints([1, 2, 3]))[0] is None


def test_dedicated_sampler_gets_no_model_field(emu):
    with client(emu) as sc:
        sampler = sc.create_sampling_client(base_model=MODEL)
        assert not sampler.endpoint.queued
        sampler.sample(ModelInput.from_ints([1, 2, 3]), 1, SamplingParams(max_tokens=1))
        bodies = [r for r in emu.requests if r["method"] == "POST" and r["path"].endswith("/sample")]
        assert bodies and "model" not in (bodies[-1].get("body") or {})


def test_paired_sampler_is_provisioned_with_the_trainer_but_awaited_at_first_use(emu):
    with client(emu) as sc:
        tc = sc.create_lora_training_client(MODEL, rank=4)
        sampler_dep = emu.deployments[emu.runs[tc.run_id]["sampler"]]
        assert sampler_dep.status_polls == 0, "creating a training client does not wait for its sampler"
        tc.forward_backward([datum(tc)]).result(timeout=60)
        assert sampler_dep.status_polls == 0, "training alone never waits for the sampler"
        sampling = tc.save_weights_and_get_sampling_client("first-use").result(timeout=60)
        assert sampler_dep.status_polls >= 1, "the first publish waits for the sampler"
        polls = sampler_dep.status_polls
        assert sampling.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=1)).sequences
        assert sampler_dep.status_polls == polls, "waited for once"


def test_serverless_queue_busy_and_timeout_through_loops_client(emu):
    """The queue's 503 + Retry-After is waited out; a sample nobody waits for any more is cancelled."""
    emu.faults.update(serverless_samplers=True, queue_busy=2)
    with client(emu) as sc:
        sampler = sc.create_sampling_client(base_model=MODEL)
        started = time.monotonic()
        assert sampler.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2)).sequences
        assert time.monotonic() - started >= 1.0, "Retry-After: 1 was honoured"
        emu.faults.update(queue_busy=0, queue_hold_s=30.0)
        slow = sc.create_sampling_client(base_model=MODEL, timeout=0.5)
        with pytest.raises(APITimeoutError, match="cancelled"):
            slow.sample(ModelInput.from_ints([1, 2]), 1, SamplingParams(max_tokens=2))
        cancels = [r for r in emu.requests if r["method"] == "POST" and r["path"].endswith("/cancel")]
        assert cancels, "the client cancelled the queued sample"
