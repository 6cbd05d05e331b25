"""The emulator's routes that the published baseten-loops 0.32.0 client calls, with plain HTTP.

Each test names the client code it stands for (``baseten/loops/<file>``); the client itself
drives them in ``tests/test_published_client.py``. Here the shapes, status codes and refusals are
pinned without the side venv: teams, debug routes, checkpoint validate/source, the supported-model
check, and the serverless sampler's queue (202, polling, cancel, Retry-After).
"""

from __future__ import annotations

import time

import httpx
import pytest

from loops_backends.baseten.emulator import Emulator

KEY = "routes-emulator-key"
MODEL = "loops/tiny-qwen3"


@pytest.fixture(scope="module")
def emu():
    with Emulator(api_key=KEY).running() as e:
        yield e


@pytest.fixture
def http(emu):
    emu.faults.reset()
    with httpx.Client(base_url=emu.url, headers={"Authorization": f"Api-Key {KEY}"}, timeout=30) as c:
        yield c
    emu.faults.reset()


def _session(http: httpx.Client, root: str = "/v1/loops") -> str:
    r = http.post(f"{root}/sessions", json={})
    assert r.status_code == 200, r.text
    return r.json()["session"]["id"]


def _trainer(http: httpx.Client, sid: str, route: str = "/v1/loops/trainers", **extra) -> dict:
    r = http.post(route, json={"session_id": sid, "base_model": MODEL, "lora_rank": 4, **extra})
    assert r.status_code == 200, r.text
    return r.json()["run"]


def _op(http: httpx.Client, base: str, path: str, body: dict, run_id: str) -> dict:
    """Submit a trainer op and wait for its result (the trainer protocol)."""
    h = {"Idempotency-Key": f"k-{time.monotonic_ns()}", "X-Run-Id": run_id}
    r = http.post(f"{base}{path}", json={**body, "run_id": run_id}, headers=h)
    assert r.status_code == 202, r.text
    op = r.json()["operation_id"]
    while (p := http.get(f"{base}/operations/{op}", headers={"X-Run-Id": run_id})).status_code == 408:
        pass
    assert p.json()["status"] == "done", p.text
    return p.json()["result"]


def test_teams_resolve_and_scope_the_create_routes(http, emu):
    # service_client._resolve_team_id / _urls.loops_api_root
    teams = http.get("/v1/teams").json()["teams"]
    team = next(t for t in teams if t["name"] == "loops-emulator")
    root = f"/v1/teams/{team['id']}/loops"
    sid = _session(http, root)
    run = _trainer(http, sid, f"{root}/trainers")
    assert run["id"] in emu.runs
    assert [r["team_id"] for r in emu.requests if r["path"] == f"{root}/trainers"][-1] == team["id"]
    r = http.post("/v1/teams/team-nope/loops/sessions", json={})
    assert r.status_code == 404 and "GET /v1/teams" in r.json()["detail"]


def test_debug_routes_take_scope_and_version(http, emu):
    # service_client._create_route: {root}/debug/{trainers,samplers} with scope / debug_version
    sid = _session(http)
    run = _trainer(http, sid, "/v1/loops/debug/trainers", scope="serverless", debug_version="v9")
    assert run["deployment_id"] is None  # serverless: nothing to watch
    health = f"{run['base_url']}/health"
    assert http.get(health, headers={"X-Run-Id": run["id"]}).status_code == 200
    anonymous = http.get(health)  # the shared gateway authorises every request against a run
    assert anonymous.status_code == 400 and anonymous.headers["X-Baseten-Error-Source"] == "06"
    assert [r for r in emu.requests if r["path"] == "/v1/loops/debug/trainers"][-1]["debug_version"] == "v9"
    dedicated = _trainer(http, sid, "/v1/loops/debug/trainers", scope="deployment")
    assert dedicated["deployment_id"]
    r = http.post("/v1/loops/debug/trainers", json={"session_id": sid, "base_model": MODEL, "lora_rank": 4,
                                                    "scope": "galaxy"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "scope"
    r = http.post("/v1/loops/debug/samplers", json={"session_id": sid, "base_model": MODEL, "scope": "team"})
    assert r.status_code == 400  # team is a trainer-only scope


def test_unsupported_base_models_are_refused_naming_the_supported_ones(http, emu):
    sid = _session(http)
    before = len(emu.deployments)
    for route, body in [("/v1/loops/trainers", {"lora_rank": 4}), ("/v1/loops/samplers", {})]:
        r = http.post(route, json={"session_id": sid, "base_model": "Qwen/Qwen3-8B", **body})
        assert r.status_code == 400, r.text
        assert MODEL in r.json()["detail"] and r.json()["error"]["field"] == "base_model"
    assert len(emu.deployments) == before  # nothing was provisioned
    caps = http.get("/v1/loops/capabilities").json()["supported_models"]
    assert [m["model_name"] for m in caps] == [MODEL]


def test_more_models_can_be_supported():
    with Emulator(api_key=KEY, models=[MODEL, "org/other"]).running() as e, \
            httpx.Client(base_url=e.url, headers={"Authorization": f"Api-Key {KEY}"}) as c:
        assert [m["model_name"] for m in c.get("/v1/loops/capabilities").json()["supported_models"]] == \
            [MODEL, "org/other"]
        sid = c.post("/v1/loops/sessions", json={}).json()["session"]["id"]
        assert c.post("/v1/loops/samplers", json={"session_id": sid, "base_model": "org/other"}).status_code == 200


def test_checkpoint_validate_and_source(http, emu):
    # training_client._validate_checkpoint; _checkpoints.get_source
    sid = _session(http)
    run = _trainer(http, sid)
    base = run["base_url"].removeprefix(emu.url)
    saved = _op(http, base, "/save_weights_for_sampler", {"name": "v1"}, run["id"])
    path = f"bt://loops:{run['id']}/sampler_weights/v1"
    r = http.post("/v1/loops/checkpoints/validate", json={"checkpoint_path": path, "run_id": run["id"]})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    assert http.post("/v1/loops/checkpoints/validate", json={"checkpoint_path": saved["path"]}).status_code == 200
    missing = http.post("/v1/loops/checkpoints/validate",
                        json={"checkpoint_path": f"bt://loops:{run['id']}/sampler_weights/nope"})
    assert missing.status_code == 404
    for bad in ({}, {"checkpoint_path": "s3://elsewhere"}):
        r = http.post("/v1/loops/checkpoints/validate", json=bad)
        assert r.status_code == 400, r.text
    cid = http.get("/v1/loops/checkpoints", params={"run_id": run["id"]}).json()["checkpoints"][0]["id"]
    assert http.get(f"/v1/loops/checkpoints/{cid}/source").json() == {"source": {"kind": "s3"}}
    assert http.get(f"/v1/loops/checkpoints/{run['id']}/weights/nope/source").status_code == 404
    assert http.get("/v1/loops/checkpoints/nope/source").status_code == 400  # not an id at all


# ---- the serverless sampler's queue (sampling_client.sample_async's queued path) ------------------
def _serverless_sampler(http: httpx.Client) -> dict:
    sid = _session(http)
    r = http.post("/v1/loops/debug/samplers", json={"session_id": sid, "base_model": MODEL, "scope": "serverless"})
    assert r.status_code == 200, r.text
    sampler = r.json()["sampler"]
    assert sampler["model_id"] is None and sampler["deployment_id"] is None  # deployment_from_sampler: serverless
    return sampler


def _submit(http: httpx.Client, sampler: dict, *, key: str = "key-1", body: dict | None = None,
            headers: dict | None = None) -> httpx.Response:
    body = {"prompt": [11, 12, 13], "n": 2, "max_tokens": 3, "model": MODEL} if body is None else body
    h = {"X-Sampler-Id": sampler["id"], **({"Idempotency-Key": key} if key else {}), **(headers or {})}
    return http.post(f"{sampler['base_url']}/sample", json=body, headers=h)


def _poll(http: httpx.Client, sampler: dict, op: str, **params) -> httpx.Response:
    return http.get(f"{sampler['base_url']}/operations/{op}", params=params, headers={"X-Sampler-Id": sampler["id"]})


def test_serverless_sample_is_accepted_then_polled(http, emu):
    sampler = _serverless_sampler(http)
    r = _submit(http, sampler)
    assert r.status_code == 202 and r.json()["schema_version"] == 1, r.text
    op = r.json()["operation_id"]
    assert _submit(http, sampler).json()["operation_id"] == op  # the same key: the same job, run once
    done = _poll(http, sampler, op)
    assert done.status_code == 200 and done.json()["status"] == "done", done.text
    choices = done.json()["result"]["choices"]
    assert len(choices) == 2 and all(c["token_ids"] or c["logprobs"] for c in choices)
    assert _poll(http, sampler, "sop-unknown").status_code == 404
    assert [r["body"]["model"] for r in emu.requests if r["path"].endswith("/sample")][-1] == MODEL


def test_serverless_submits_are_refused_without_key_model_or_identity(http):
    sampler = _serverless_sampler(http)
    assert _submit(http, sampler, key="").status_code == 400  # Idempotency-Key is required
    r = _submit(http, sampler, key="k2", body={"prompt": [11, 12], "max_tokens": 2})
    assert r.status_code == 400 and "model" in r.json()["detail"]
    r = _submit(http, sampler, key="k3", body={"prompt": [11, 12], "max_tokens": 2, "model": "other/model"})
    assert r.status_code == 404
    r = http.post(f"{sampler['base_url']}/sample", json={"prompt": [1], "model": MODEL},
                  headers={"Idempotency-Key": "k4"})
    assert r.status_code == 400 and r.headers["X-Baseten-Error-Source"] == "06"  # the gateway's own refusal
    assert r.json()["details"]["reason"] == "run_or_sampler_required"


def test_serverless_queue_cancel_busy_and_hold(http, emu):
    sampler = _serverless_sampler(http)
    emu.faults.update(queue_hold_s=30.0)
    queued = _submit(http, sampler, key="held").json()["operation_id"]
    assert _poll(http, sampler, queued, timeout=0.2).status_code == 408  # still queued
    cancel = http.post(f"{sampler['base_url']}/operations/{queued}/cancel", headers={"X-Sampler-Id": sampler["id"]})
    assert cancel.status_code == 200
    assert _poll(http, sampler, queued).json()["status"] == "error"  # cancelled: it never ran
    emu.faults.update(queue_hold_s=0.0, queue_busy=1)
    busy = _submit(http, sampler, key="busy")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    ran = _submit(http, sampler, key="busy").json()["operation_id"]  # the retry, same key, goes through
    assert _poll(http, sampler, ran).json()["status"] == "done"
    again = http.post(f"{sampler['base_url']}/operations/{ran}/cancel", headers={"X-Sampler-Id": sampler["id"]})
    assert again.status_code == 409  # only a queued sample can be cancelled


def test_serverless_samplers_fault_makes_paired_samplers_serverless(http, emu):
    emu.faults.update(serverless_samplers=True)
    sid = _session(http)
    run = _trainer(http, sid)
    r = http.post("/v1/loops/samplers", json={"session_id": sid, "run_id": run["id"]})
    assert r.json()["sampler"]["model_id"] is None


# ---- dedicated /sample faults (what the published client retries there) ----------------------------
def test_dedicated_sample_faults(http, emu):
    sid = _session(http)
    sampler = http.post("/v1/loops/samplers", json={"session_id": sid, "base_model": MODEL}).json()["sampler"]
    url, h = f"{sampler['base_url']}/sample", {"X-Sampler-Id": sampler["id"]}
    body = {"prompt": [11, 12], "max_tokens": 2}
    assert http.post(url, json=body, headers=h).status_code == 200
    emu.faults.update(sample_burst_count=2, sample_burst_status=503)
    assert [http.post(url, json=body, headers=h).status_code for _ in range(3)] == [503, 503, 200]
    emu.faults.update(dedicated_model_name="default")
    r = http.post(url, json={**body, "model": MODEL}, headers=h)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    assert http.post(url, json={**body, "model": "default"}, headers=h).status_code == 200
    assert http.post(url, json=body, headers=h).status_code == 200  # no model: what the published client sends
    recorded = [r for r in emu.requests if r["path"].endswith("/sample")][-1]
    assert recorded["body"] == body  # tests can read what a client sent
