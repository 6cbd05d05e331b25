"""Drive every public method of the published baseten-loops client against one loops target.

Runs under the side venv's Python (>= 3.12, ``baseten-loops`` installed), never under loops' own.
Usage::

    python drive_published_client.py CONFIG_JSON

CONFIG_JSON names the target: ``{"mode": "local", "trainer_url", "sampler_url", "base_model", ...}``
(``loops serve`` through ``ServiceClient.local``) or ``{"mode": "service", "base_url", "api_key",
"base_model", ...}`` (``loops emulate baseten`` through the full ``ServiceClient``), plus ``tmp`` (a
scratch directory) and ``subset`` (check names to run; empty: all).

It prints one JSON line per check, ``{"check", "ok", "detail", "seconds"}``, then one line
``{"methods": [...]}`` naming every public method of the three client classes, so the test can
prove that each one was exercised. Whether a failure is expected is the test's business, not this
script's: it only reports what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

import httpx

import baseten.loops.training_client as training_module
from baseten.loops import (AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, TensorData)
from baseten.loops.models import ImageChunk
from baseten.loops.sampling_client import SamplingClient
from baseten.loops.training_client import TrainingClient

logging.basicConfig(level=logging.ERROR)
CFG = json.loads(sys.argv[1])
LOCAL = CFG["mode"] == "local"
BASE_MODEL = CFG["base_model"]
TMP = Path(CFG["tmp"])
SUBSET = set(CFG.get("subset") or [])
PER_CHECK_S = float(CFG.get("per_check_s", 90))
READY_S = float(CFG.get("ready_timeout", 20))
CHECKS: list[tuple[str, object]] = []
OPT_IN: set[str] = set()  # checks that run only when the subset names them (they need a special target)
ctx: dict = {}


def check(name: str, *, opt_in: bool = False):
    def register(fn):
        CHECKS.append((name, fn))
        if opt_in:
            OPT_IN.add(name)
        return fn
    return register


class CheckTimeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise CheckTimeout(f"no answer within {PER_CHECK_S:.0f} s")


def need(key: str):
    if key not in ctx:
        raise RuntimeError(f"prerequisite {key!r} is missing (an earlier check failed)")
    return ctx[key]


def run_async(coro):
    return asyncio.run(coro)


# ---- data ---------------------------------------------------------------------------------------
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]
ANSWER = [21, 22, 23]


def ce_datum(weights: bool = False) -> Datum:
    tokens = PROMPT + ANSWER
    targets = ([-100] * len(PROMPT) + ANSWER)[1:]
    inputs = {"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])}
    if weights:
        inputs["weights"] = TensorData(data=[0.0 if t < 0 else 1.0 for t in targets], dtype="float32",
                                       shape=[len(targets)])
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def rl_datum() -> Datum:
    d = ce_datum()
    n = len(d.loss_fn_inputs["target_tokens"].data)
    d.loss_fn_inputs["logprobs"] = TensorData(data=[-2.0] * n, dtype="float32", shape=[n])
    d.loss_fn_inputs["advantages"] = TensorData(data=[0.5] * n, dtype="float32", shape=[n])
    return d


def sampling_dir() -> str:
    return str(TMP / f"dl-{uuid.uuid4().hex[:8]}")


def headers() -> dict:
    return {"Authorization": f"Api-Key {CFG['api_key']}"} if CFG.get("api_key") else {}


# ---- ServiceClient ------------------------------------------------------------------------------
@check("ServiceClient.local" if LOCAL else "ServiceClient.__init__")
def make_service():
    if LOCAL:
        sc = ServiceClient.local(trainer_url=CFG["trainer_url"], sampler_url=CFG["sampler_url"])
    else:
        sc = ServiceClient(base_url=CFG["base_url"], api_key=CFG["api_key"])
    ctx["sc"] = sc
    return f"session {sc.session_id}"


@check("ServiceClient.__init__[team]")
def make_team_service():
    if LOCAL:
        raise RuntimeError("ServiceClient.local has no team argument")
    sc = ServiceClient(base_url=CFG["base_url"], api_key=CFG["api_key"], team="loops-emulator")
    return f"team {sc._team_id}, session {sc.session_id}"


@check("ServiceClient.session_id")
def session_id():
    return need("sc").session_id


@check("ServiceClient.get_server_capabilities")
def capabilities():
    caps = need("sc").get_server_capabilities()
    names = [m.model_name for m in caps.supported_models]
    assert BASE_MODEL in names, names
    return names


@check("ServiceClient.get_server_capabilities_async")
def capabilities_async():
    return [m.model_name for m in run_async(need("sc").get_server_capabilities_async()).supported_models]


@check("ServiceClient.create_lora_training_client")
def make_trainer():
    tc = need("sc").create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0, ready_timeout=READY_S)
    ctx["tc"] = tc
    return f"run {tc.run_id}"


@check("ServiceClient.create_lora_training_client[unsupported base model]")
def unsupported_model():
    if LOCAL:
        raise RuntimeError("ServiceClient.local provisions nothing, so nothing checks the base model")
    try:
        need("sc").create_lora_training_client(base_model="no-such/model-7b", rank=4, ready_timeout=READY_S)
    except httpx.HTTPStatusError as exc:
        status, text = exc.response.status_code, exc.response.text
        assert 400 <= status < 500 and BASE_MODEL in text, (status, text[:200])
        return f"{status}: {text[:120]}"
    raise AssertionError("an unsupported base model was provisioned")


@check("ServiceClient.create_lora_training_client_async")
def make_trainer_async():
    tc = run_async(need("sc").create_lora_training_client_async(base_model=BASE_MODEL, rank=4,
                                                                ready_timeout=READY_S))
    tc.close()
    return f"run {tc.run_id}"


@check("ServiceClient.create_lora_training_client[scope=serverless]")
def make_serverless_trainer():
    if LOCAL:
        raise RuntimeError("ServiceClient.local has no scopes")
    tc = need("sc").create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S,
                                                scope="serverless")
    out = tc.forward_backward([ce_datum()]).result(timeout=60)
    ctx["serverless_tc"] = tc
    return f"run {tc.run_id}, {type(tc._deployment).__name__}, loss {out.loss:.3f}"


# ---- TrainingClient -----------------------------------------------------------------------------
@check("TrainingClient.run_id")
def run_id():
    return need("tc").run_id


@check("TrainingClient.base_checkpoint")
def base_checkpoint():
    return repr(need("tc").base_checkpoint)


@check("TrainingClient.get_info")
def get_info():
    info = need("tc").get_info()
    assert info.model_name == BASE_MODEL
    return info.model_dump()


@check("TrainingClient.health")
def health():
    need("tc").health()
    return "ok"


@check("TrainingClient.init_trainer_server")
def init_trainer():
    return need("tc").init_trainer_server(lora_rank=4).result(timeout=60).model_dump()


@check("TrainingClient.init_trainer_server_async")
def init_trainer_async():
    tc = need("tc")

    async def go():
        return await (await tc.init_trainer_server_async(lora_rank=4)).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.forward_backward")
def forward_backward():
    tc = need("tc")
    first = tc.forward_backward([ce_datum()]).result(timeout=60)
    for _ in range(8):
        tc.forward_backward([ce_datum()]).result(timeout=60)
        tc.optim_step(AdamParams(learning_rate=5e-2)).result(timeout=60)
    last = tc.forward_backward([ce_datum()]).result(timeout=60)
    assert last.loss < first.loss, (first.loss, last.loss)
    assert len(last.loss_fn_outputs) == 1 and "logprobs" in last.loss_fn_outputs[0]
    return f"loss {first.loss:.3f} -> {last.loss:.3f}; metrics {last.metrics}"


@check("TrainingClient.forward_backward_async")
def forward_backward_async():
    tc = need("tc")

    async def go():
        futures = [await tc.forward_backward_async([ce_datum()]) for _ in range(4)]
        return await asyncio.gather(*(f.result_async(timeout=60) for f in futures))

    outs = run_async(go())
    return f"{len(outs)} in flight, losses {[round(o.loss, 3) for o in outs]}"


@check("TrainingClient.forward")
def forward():
    out = need("tc").forward([ce_datum(weights=True)]).result(timeout=60)
    return f"loss {out.loss:.3f}"


@check("TrainingClient.forward_async")
def forward_async():
    tc = need("tc")

    async def go():
        return await (await tc.forward_async([ce_datum()])).result_async(timeout=60)

    return f"loss {run_async(go()).loss:.3f}"


@check("TrainingClient.forward[top_k_logprobs]")
def forward_top_k():
    out = need("tc").forward([ce_datum()], top_k_logprobs=3).result(timeout=60)
    keys = sorted(out.loss_fn_outputs[0])
    assert len(keys) > 1, f"only {keys}: top_k_logprobs=3 was ignored"
    return keys


@check("TrainingClient.forward[chunked totals]")
def forward_chunked():
    """The client splits a batch over its request cap and aggregates the chunks; the totals must
    equal the same batch sent whole. The cap is lowered so a small batch splits (the aggregation
    code that runs is the published client's own)."""
    tc = need("tc")
    data = [ce_datum() for _ in range(6)]
    whole = tc.forward(data).result(timeout=60)
    saved = training_module._MAX_REQUEST_BYTES
    training_module._MAX_REQUEST_BYTES = 1200
    try:
        fut = tc.forward(data)
        assert type(fut).__name__ == "_ChunkedForwardBackwardFuture", f"not split: {type(fut).__name__}"
        chunked = fut.result(timeout=60)
    finally:
        training_module._MAX_REQUEST_BYTES = saved
    diffs = {k: (whole.metrics.get(k), chunked.metrics.get(k)) for k in set(whole.metrics) | set(chunked.metrics)
             if abs((whole.metrics.get(k) or 0.0) - (chunked.metrics.get(k) or 0.0)) > 1e-4}
    if abs(whole.loss - chunked.loss) > 1e-4:
        diffs["loss"] = (whole.loss, chunked.loss)
    assert not diffs, f"whole vs chunked differ: {diffs}"
    return f"loss {whole.loss:.4f} both ways; metrics {sorted(whole.metrics)}"


@check("TrainingClient.forward_backward[image datum refused at submit]")
def image_datum():
    tc = need("tc")
    image = ImageChunk(data=b"\x89PNG fake", format="png", expected_tokens=2)
    n = len(PROMPT) + 2
    datum = Datum(model_input=ModelInput.from_ints(PROMPT).append(image),
                  loss_fn_inputs={"target_tokens": TensorData(data=[-100] * (n - 1) + [21], dtype="int64",
                                                              shape=[n])})
    started = time.monotonic()
    try:
        fut = tc.forward_backward([datum])
    except httpx.HTTPStatusError as exc:
        assert exc.response.status_code == 400, exc.response.status_code
        assert time.monotonic() - started < 10, "refused only after retrying"
        return f"400 at submit: {exc.response.text[:120]}"
    try:
        fut.result(timeout=60)
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"accepted at submit, failed later: {type(exc).__name__}: {str(exc)[:120]}") from None
    raise AssertionError("an image datum was trained on")


@check("TrainingClient.forward_backward[dppo]")
def dppo():
    out = need("tc").forward_backward([rl_datum()], loss_fn="dppo").result(timeout=60)
    return f"loss {out.loss:.4f} metrics {out.metrics}"


@check("TrainingClient.forward_backward[cispo]")
def cispo():
    out = need("tc").forward_backward([rl_datum()], loss_fn="cispo",
                                      loss_fn_config={"clip_low_threshold": 0.8,
                                                      "clip_high_threshold": 1.2}).result(timeout=60)
    return f"loss {out.loss:.4f}"


@check("TrainingClient.forward_backward_custom")
def fb_custom():
    def loss_fn(data, logprobs):
        total = sum(-lp.sum() for lp in logprobs)
        return total, {"custom": float(total)}

    out = need("tc").forward_backward_custom([ce_datum()], loss_fn).result(timeout=60)
    return f"loss {out.loss:.3f} metrics {out.metrics}"


@check("TrainingClient.forward_backward_custom_async")
def fb_custom_async():
    tc = need("tc")

    def loss_fn(data, logprobs):
        total = sum(-lp.sum() for lp in logprobs)
        return total, {"custom": float(total)}

    async def go():
        return await (await tc.forward_backward_custom_async([ce_datum()], loss_fn)).result_async(timeout=60)

    return f"loss {run_async(go()).loss:.3f}"


@check("TrainingClient.optim_step")
def optim_step():
    return need("tc").optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60).model_dump()


@check("TrainingClient.optim_step_async")
def optim_step_async():
    tc = need("tc")

    async def go():
        return await (await tc.optim_step_async(AdamParams(learning_rate=1e-2))).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.policy_version")
def policy_version():
    return need("tc").policy_version


@check("TrainingClient.save_state")
def save_state():
    out = need("tc").save_state("state-a").result(timeout=60)
    ctx["state_path"] = out.path
    return out.model_dump()


@check("TrainingClient.save_state_async")
def save_state_async():
    tc = need("tc")

    async def go():
        return await (await tc.save_state_async("state-b")).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.save_weights_for_sampler")
def save_for_sampler():
    out = need("tc").save_weights_for_sampler("staged").result(timeout=60)
    ctx["staged_path"] = out.path
    return out.model_dump()


@check("TrainingClient.save_weights_for_sampler_async")
def save_for_sampler_async():
    tc = need("tc")

    async def go():
        return await (await tc.save_weights_for_sampler_async("staged-b")).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.save_weights_and_get_sampling_client")
def save_and_sample():
    sc = need("tc").save_weights_and_get_sampling_client("pub")
    ctx["paired"] = sc
    r = sc.sample(ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=SamplingParams(max_tokens=4))
    assert len(r.sequences) == 2 and all(s.tokens for s in r.sequences)
    return f"policy_version {r.policy_version}, {[s.tokens for s in r.sequences]}"


@check("TrainingClient.save_weights_for_sampler[bump_version false keeps the sampler's version]")
def bump_version():
    tc, paired = need("tc"), need("paired")
    url = paired._deployment.base_url
    live = httpx.get(f"{url}/trainers_policy_version", headers=headers(), timeout=10).json()["policy_version"]
    tc.forward_backward([ce_datum()]).result(timeout=60)
    tc.optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60)
    tc.save_weights_for_sampler("staged-c").result(timeout=60)
    after = httpx.get(f"{url}/trainers_policy_version", headers=headers(), timeout=10).json()["policy_version"]
    assert after == live, f"the sampler hot-swapped: {live} -> {after}"
    return f"sampler stays at version {live}"


@check("TrainingClient.save_weights_and_get_sampling_client_async")
def save_and_sample_async():
    tc = need("tc")
    sc = run_async(tc.save_weights_and_get_sampling_client_async("pub-async"))
    r = sc.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=3))
    return f"policy_version {r.policy_version}"


@check("TrainingClient.create_sampling_client")
def tc_create_sampling_client():
    tc = need("tc")
    path = ctx.get("staged_path") or f"bt://loops:{tc.run_id}/sampler_weights/staged"
    sc = tc.create_sampling_client(path)
    r = sc.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=3))
    return f"{path}: policy_version {r.policy_version}"


@check("TrainingClient.load_state")
def load_state():
    return need("tc").load_state(need("state_path")).result(timeout=60).model_dump()


@check("TrainingClient.load_state_async")
def load_state_async():
    tc, path = need("tc"), need("state_path")

    async def go():
        return await (await tc.load_state_async(path)).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.load_state_with_optimizer")
def load_state_opt():
    return need("tc").load_state_with_optimizer(need("state_path")).result(timeout=60).model_dump()


@check("TrainingClient.load_state_with_optimizer_async")
def load_state_opt_async():
    tc, path = need("tc"), need("state_path")

    async def go():
        return await (await tc.load_state_with_optimizer_async(path)).result_async(timeout=60)

    return run_async(go()).model_dump()


@check("TrainingClient.load_state[missing path is a 400 at submit]")
def load_missing():
    tc = need("tc")
    started = time.monotonic()
    try:
        tc.load_state(f"bt://loops:{tc.run_id}/weights/no-such-state").result(timeout=60)
    except httpx.HTTPStatusError as exc:
        took = time.monotonic() - started
        assert exc.response.status_code == 400 and took < 10, (exc.response.status_code, f"{took:.1f} s")
        return f"400 after {took:.1f} s"
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"{type(exc).__name__} after {time.monotonic() - started:.1f} s: "
                             f"{str(exc)[:120]}") from None
    raise AssertionError("loaded a checkpoint that does not exist")


@check("TrainingClient.list_checkpoints")
def tc_list():
    names = sorted(c.checkpoint_id for c in need("tc").list_checkpoints())
    assert "state-a" in names, names
    return names


@check("TrainingClient.get_checkpoint_archive_url")
def tc_archive():
    page = need("tc").get_checkpoint_archive_url(name="state-a", target="trainer")
    assert page.total_count > 0
    return f"{page.total_count} files"


@check("TrainingClient.download_checkpoint")
def tc_download():
    out = need("tc").download_checkpoint(name="state-a", target="trainer", dest_dir=sampling_dir())
    assert out.file_count > 0 and out.bytes_written > 0
    return f"{out.file_count} files, {out.bytes_written} bytes"


@check("TrainingClient.get_tokenizer")
def tc_tokenizer():
    return type(need("tc").get_tokenizer()).__name__


# ---- SamplingClient -----------------------------------------------------------------------------
@check("ServiceClient.create_sampling_client")
def make_sampler():
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S)
    ctx["sampler"] = s
    return type(s._deployment).__name__


@check("ServiceClient.create_sampling_client_async")
def make_sampler_async():
    s = run_async(need("sc").create_sampling_client_async(base_model=BASE_MODEL, ready_timeout=READY_S))
    return type(s._deployment).__name__


@check("ServiceClient.create_sampling_client[model_path]")
def make_sampler_from_path():
    tc = need("tc")
    path = f"bt://loops:{tc.run_id}/sampler_weights/pub"
    s = need("sc").create_sampling_client(model_path=path, ready_timeout=READY_S)
    r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=3))
    return f"{s.checkpoint_path}: {r.sequences[0].tokens}"


@check("ServiceClient.create_sampling_client[scope=serverless]")
def make_serverless_sampler():
    if LOCAL:
        raise RuntimeError("ServiceClient.local has no scopes")
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S, scope="serverless")
    r = s.sample(ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=SamplingParams(max_tokens=3))
    assert len(r.sequences) == 2 and all(x.tokens for x in r.sequences), r
    lps = s.compute_logprobs(ModelInput.from_ints(PROMPT))
    assert lps[0] is None and all(isinstance(x, float) for x in lps[1:]), lps
    return f"{type(s._deployment).__name__}: {[x.tokens for x in r.sequences]}"


def emulator(method: str, path: str, body: dict | None = None) -> dict:
    """The emulator's test controls (``/_emulator/...``); only the service target has them."""
    if LOCAL:
        raise RuntimeError("loops serve has no fault controls (they belong to loops emulate baseten)")
    r = httpx.request(method, f"{CFG['base_url']}{path}", json=body, headers=headers(), timeout=30)
    r.raise_for_status()
    return r.json()


def last_sample() -> dict:
    """The emulator's record of the latest ``/sample`` request (its body and headers)."""
    recs = emulator("GET", "/_emulator/state?requests=400")["requests"]
    return [r for r in recs if r["method"] == "POST" and r["path"].endswith("/sample")][-1]


@check("SamplingClient.sample[serverless: a timeout cancels the queued sample]")
def serverless_timeout():
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S, scope="serverless",
                                          timeout=1.0)
    emulator("POST", "/_emulator/faults", {"queue_hold_s": 30.0})
    started = time.monotonic()
    try:
        s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    except TimeoutError as exc:  # SampleTimeoutError
        took = time.monotonic() - started
        recs = emulator("GET", "/_emulator/state?requests=50")["requests"]
        cancels = [r for r in recs if r["method"] == "POST" and r["path"].endswith("/cancel")]
        assert cancels, "no cancel was sent"
        return f"{type(exc).__name__} after {took:.1f} s, then {cancels[-1]['path'].rsplit('/', 3)[-3:]}"
    finally:
        emulator("POST", "/_emulator/faults", {"reset": True})
    raise AssertionError("a sample held in the queue came back within the 1 s timeout")


@check("SamplingClient.sample[serverless: 503 with Retry-After is waited out]")
def serverless_busy():
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S, scope="serverless")
    emulator("POST", "/_emulator/faults", {"queue_busy": 2})
    try:
        started = time.monotonic()
        r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
        took = time.monotonic() - started
    finally:
        emulator("POST", "/_emulator/faults", {"reset": True})
    assert r.sequences and took >= 1.9, took
    return f"2 busy answers waited out in {took:.1f} s"


@check("SamplingClient.sample[dedicated: replica turnover 503/404 retried]")
def dedicated_turnover():
    s = need("sampler")
    emulator("POST", "/_emulator/faults", {"sample_burst_count": 1, "sample_burst_status": 503})
    try:
        r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
        emulator("POST", "/_emulator/faults", {"sample_burst_count": 1, "sample_burst_status": 404})
        r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    finally:
        emulator("POST", "/_emulator/faults", {"reset": True})
    return f"retried: {r.sequences[0].tokens}"


@check("SamplingClient.compute_logprobs[wire: max_tokens 1, prompt_logprobs 0, model only when serverless]")
def wire_fields():
    need("sampler").compute_logprobs(ModelInput.from_ints(PROMPT))
    dedicated = last_sample()
    serverless = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S, scope="serverless")
    serverless.compute_logprobs(ModelInput.from_ints(PROMPT))
    queued = last_sample()
    for rec in (dedicated, queued):
        b = rec["body"]
        assert b["max_tokens"] == 1 and b["prompt_logprobs"] == 0 and b["logprobs"] == 0, b
        assert rec["idempotency-key"], rec
    assert "model" not in dedicated["body"] and queued["body"]["model"] == BASE_MODEL, (dedicated, queued)
    return {"dedicated": sorted(dedicated["body"]), "serverless": sorted(queued["body"])}


@check("ServiceClient.create_lora_training_client[paired sampler: created at first use, or eagerly unawaited]")
def paired_sampler_timing():
    def sampler_posts(run: str) -> int:
        recs = emulator("GET", "/_emulator/state?requests=400")["requests"]
        return sum(1 for r in recs if r["method"] == "POST" and r["path"].endswith("/samplers")
                   and (r.get("body") or {}).get("run_id") == run)

    sc = need("sc")
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S)
    at_creation = sampler_posts(tc.run_id)
    tc.save_weights_for_sampler("plain").result(timeout=60)
    after_plain_save = sampler_posts(tc.run_id)
    tc.save_weights_and_get_sampling_client("first")
    after_first_client = sampler_posts(tc.run_id)
    tc.close()
    mark = len(emulator("GET", "/_emulator/state?requests=20000")["requests"])
    eager = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S, with_sampler=True)
    eager_posts = sampler_posts(eager.run_id)
    during = emulator("GET", "/_emulator/state?requests=20000")["requests"][mark:]
    status_polls = sum(1 for r in during if r["method"] == "GET" and r["path"].startswith("/v1/models/"))
    eager.close()
    seen = (at_creation, after_plain_save, after_first_client, eager_posts, status_polls)
    assert seen == (0, 0, 1, 1, 0), seen
    return "POST /samplers: none at creation or on a plain save, one at the first sampling client; " \
           "with_sampler=True: one at creation, its status never polled"


@check("TrainingClient.save_weights_and_get_sampling_client[serverless]")
def serverless_publish():
    tc = need("serverless_tc")
    s = tc.save_weights_and_get_sampling_client("sv")
    r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=3))
    assert r.sequences and s.checkpoint_path, (r, s.checkpoint_path)
    return f"pinned {s.checkpoint_path}"


@check("SamplingClient.sample")
def sample():
    s = need("sampler")
    r = s.sample(ModelInput.from_ints(PROMPT), num_samples=2,
                 sampling_params=SamplingParams(max_tokens=5, temperature=0.0, seed=1, stop=[99]),
                 include_prompt_logprobs=True, topk_prompt_logprobs=2, affinity_key="group-1")
    assert len(r.sequences) == 2 and r.prompt_logprobs and r.prompt_logprobs[0] is None
    assert r.topk_prompt_logprobs and len(r.topk_prompt_logprobs[1]) >= 2, r.topk_prompt_logprobs
    return f"{[x.tokens for x in r.sequences]} policy_version {r.policy_version}"


@check("SamplingClient.sample_async")
def sample_async():
    s = need("sampler")

    async def go():
        return await asyncio.gather(*(s.sample_async(ModelInput.from_ints(PROMPT),
                                                     sampling_params=SamplingParams(max_tokens=3))
                                      for _ in range(8)))

    return f"{len(run_async(go()))} in flight"


@check("SamplingClient.compute_logprobs")
def compute_logprobs():
    lps = need("sampler").compute_logprobs(ModelInput.from_ints(PROMPT))
    assert len(lps) == len(PROMPT) and lps[0] is None and all(isinstance(x, float) for x in lps[1:]), lps
    return [round(x, 3) if x is not None else None for x in lps[:4]]


@check("SamplingClient.compute_logprobs_async")
def compute_logprobs_async():
    lps = run_async(need("sampler").compute_logprobs_async(ModelInput.from_ints(PROMPT)))
    return len(lps)


@check("SamplingClient.discover_base_model_name")
def discover_base():
    name = need("sampler").discover_base_model_name()
    return name


@check("SamplingClient.discover_adapter_name")
def discover_adapter():
    return repr(need("paired").discover_adapter_name())


@check("SamplingClient.get_base_model")
def get_base_model():
    assert need("sampler").get_base_model() == BASE_MODEL
    return BASE_MODEL


@check("SamplingClient.checkpoint_path")
def checkpoint_path():
    return repr(need("paired").checkpoint_path)


@check("SamplingClient.checkpoint_name")
def checkpoint_name():
    return repr(need("paired").checkpoint_name)


@check("SamplingClient.ensure_ready")
def ensure_ready():
    need("sampler").ensure_ready(READY_S)
    return "ok"


@check("SamplingClient.ensure_ready_async")
def ensure_ready_async():
    run_async(need("sampler").ensure_ready_async(READY_S))
    return "ok"


@check("SamplingClient.ensure_ready_for_deployment")
def ensure_ready_for_deployment():
    s = need("sampler")
    SamplingClient.ensure_ready_for_deployment(base_model=BASE_MODEL, deployment=s._deployment,
                                               api_key=CFG.get("api_key"), ready_timeout=READY_S)
    return "ok"


@check("SamplingClient.__getstate__")
def pickled():
    clone = pickle.loads(pickle.dumps(need("sampler")))
    r = clone.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    clone.close()
    return f"a pickled copy sampled {r.sequences[0].tokens}"


@check("SamplingClient.get_tokenizer")
def sampler_tokenizer():
    return type(need("sampler").get_tokenizer()).__name__


@check("SamplingClient.close")
def sampler_close():
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S)
    s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    s.close()
    return "ok"


@check("SamplingClient.aclose")
def sampler_aclose():
    s = need("sc").create_sampling_client(base_model=BASE_MODEL, ready_timeout=READY_S)

    async def go():
        await s.sample_async(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
        await s.aclose()

    run_async(go())
    return "ok"


# ---- ServiceClient: checkpoints -----------------------------------------------------------------
@check("ServiceClient.list_checkpoints")
def sc_list():
    names = sorted(c.checkpoint_id for c in need("sc").list_checkpoints(need("tc").run_id))
    assert "state-a" in names, names
    return names


@check("ServiceClient.get_checkpoint_archive_url")
def sc_archive():
    page = need("sc").get_checkpoint_archive_url(name="pub", run_id=need("tc").run_id, target="sampler")
    return f"{page.total_count} files"


@check("ServiceClient.download_checkpoint")
def sc_download():
    out = need("sc").download_checkpoint(name="pub", run_id=need("tc").run_id, target="sampler",
                                         dest_dir=sampling_dir())
    assert out.file_count > 0
    return f"{out.file_count} files, {out.bytes_written} bytes"


def _from_state(method: str, is_async: bool) -> str:
    sc, path = need("sc"), need("state_path")
    if is_async:
        tc = run_async(getattr(sc, method)(path))
    else:
        tc = getattr(sc, method)(path)
    out = tc.forward([ce_datum()]).result(timeout=60)
    tc.close()
    return f"run {tc.run_id}, loss {out.loss:.3f}"


@check("ServiceClient.create_training_client_from_state")
def from_state():
    return _from_state("create_training_client_from_state", False)


@check("ServiceClient.create_training_client_from_state_async")
def from_state_async():
    return _from_state("create_training_client_from_state_async", True)


@check("ServiceClient.create_training_client_from_state_with_optimizer")
def from_state_opt():
    return _from_state("create_training_client_from_state_with_optimizer", False)


@check("ServiceClient.create_training_client_from_state_with_optimizer_async")
def from_state_opt_async():
    return _from_state("create_training_client_from_state_with_optimizer_async", True)


# ---- the clients built directly (their constructors are public too) -----------------------------
@check("TrainingClient.__init__")
def direct_trainer():
    made = need("tc")
    tc = TrainingClient(made._deployment, lora_rank=4, base_model=BASE_MODEL, api_key=CFG.get("api_key"),
                        run_id=made.run_id, ready_timeout=READY_S)
    out = tc.forward([ce_datum()]).result(timeout=60)
    tc.close()
    return f"{type(made._deployment).__name__}: loss {out.loss:.3f}"


@check("SamplingClient.__init__")
def direct_sampler():
    made = need("sampler")
    s = SamplingClient(base_model=BASE_MODEL, deployment=made._deployment, api_key=CFG.get("api_key"),
                       sampler_id=made._sampler_id, ready_timeout=READY_S)
    r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    s.close()
    return f"{type(made._deployment).__name__}: {r.sequences[0].tokens}"


# ---- a loops serve that requires an API key (``loops serve --api-key``) -----------------------------
@check("ServiceClient.local[server with --api-key]", opt_in=True)
def local_with_key():
    sc = ServiceClient.local(trainer_url=CFG["trainer_url"], sampler_url=CFG["sampler_url"])
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S)
    return f"run {tc.run_id}"


@check("TrainingClient.__init__[api_key, server with --api-key]", opt_in=True)
def direct_trainer_with_key():
    # The workaround: the published TrainingClient takes the URL and a key directly.
    tc = TrainingClient(CFG["trainer_url"], lora_rank=4, base_model=BASE_MODEL, api_key=CFG["api_key"],
                        ready_timeout=READY_S)
    out = tc.forward_backward([ce_datum()]).result(timeout=60)
    tc.close()
    return f"loss {out.loss:.3f}"


@check("SamplingClient.__init__[api_key, server with --api-key]", opt_in=True)
def direct_sampler_with_key():
    from baseten.loops.sampling_client import LocalDeployment

    s = SamplingClient(base_model=BASE_MODEL, deployment=LocalDeployment(base_url=CFG["sampler_url"]),
                       api_key=CFG["api_key"], ready_timeout=READY_S)
    r = s.sample(ModelInput.from_ints(PROMPT), sampling_params=SamplingParams(max_tokens=2))
    s.close()
    return f"{r.sequences[0].tokens}"


# ---- closing ------------------------------------------------------------------------------------
@check("TrainingClient.__enter__")
def context_manager():
    with need("sc").create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S) as tc:
        tc.forward([ce_datum()]).result(timeout=60)
    return "ok"


@check("TrainingClient.aclose")
def tc_aclose():
    tc = need("sc").create_lora_training_client(base_model=BASE_MODEL, rank=4, ready_timeout=READY_S)

    async def go():
        await (await tc.forward_async([ce_datum()])).result_async(timeout=60)
        await tc.aclose()

    run_async(go())
    return "ok"


@check("TrainingClient.close")
def tc_close():
    need("tc").close()
    return "ok"


def public_methods() -> list[str]:
    out = []
    for cls in (ServiceClient, TrainingClient, SamplingClient):
        for name, value in vars(cls).items():
            if name.startswith("_") and name not in ("__init__", "__enter__", "__getstate__"):
                continue
            if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
                out.append(f"{cls.__name__}.{name}")
    return sorted(out)


def main() -> int:
    signal.signal(signal.SIGALRM, _alarm)
    for name, fn in CHECKS:
        if (SUBSET or name in OPT_IN) and name not in SUBSET:
            continue
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, PER_CHECK_S)
        try:
            detail, ok = fn(), True
        except BaseException as exc:  # noqa: BLE001 - every failure is a row of the table
            if isinstance(exc, KeyboardInterrupt):
                raise
            ok = False
            detail = f"{type(exc).__name__}: {str(exc)[:300]}"
            if os.environ.get("DRIVER_TRACEBACKS"):
                traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"check": name, "ok": ok, "detail": str(detail)[:400],
                          "seconds": round(time.monotonic() - started, 2)}), flush=True)
    print(json.dumps({"methods": public_methods(),
                      "defined": [n for n, _ in CHECKS]}), flush=True)
    os._exit(0)  # the clients' background threads (heartbeats, bridges) must not hold the exit


if __name__ == "__main__":
    raise SystemExit(main())
