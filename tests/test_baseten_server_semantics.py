"""Data-plane behaviour the published baseten-loops 0.32.0 client relies on, pinned on loops' servers.

Plain HTTP against a paired fake trainer + sampler (``fake_pair``, in-process ASGI). Each test says
which client code depends on it; ``backends/baseten/PUBLISHED_CLIENT_NOTES.md`` section 9 says what
server change each needs (all of them have landed). ``tests/test_published_client.py`` checks the same through the real client.
"""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import pytest

from loops_backends.fake.backend import fake_pair

MODEL = "loops/tiny-qwen3"
PUBLISHED_UA = "baseten-loops/0.32.0"


def _datum(n_prompt: int = 6, answer: tuple[int, ...] = (21, 22, 23)) -> dict:
    tokens = list(range(11, 11 + n_prompt)) + list(answer)
    targets = ([-100] * n_prompt + list(answer))[1:]
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}}}


class Pair:
    """A fake trainer + sampler pair and one client for each, speaking as the published client."""

    def __init__(self) -> None:
        self.trainer, self.sampler = fake_pair(MODEL, rank=4, seed=0, run_id=f"run-{uuid.uuid4().hex[:8]}")
        self.headers = {"User-Agent": PUBLISHED_UA, "X-Baseten-Accept-Error": "1"}

    def client(self, app) -> httpx.AsyncClient:  # noqa: ANN001
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loops",
                                 headers=self.headers, timeout=30)

    async def submit(self, path: str, body: dict) -> httpx.Response:
        async with self.client(self.trainer.app) as c:
            return await c.post(path, json={"model": MODEL, "run_id": self.trainer.run_id, **body},
                                headers={"Idempotency-Key": uuid.uuid4().hex})

    async def op(self, path: str, body: dict) -> dict:
        r = await self.submit(path, body)
        assert r.status_code == 202, r.text
        async with self.client(self.trainer.app) as c:
            while (p := await c.get(f"/operations/{r.json()['operation_id']}")).status_code == 408:
                pass
        assert p.json()["status"] == "done", p.text
        return p.json()["result"]

    async def sampler_version(self) -> int:
        async with self.client(self.sampler.app) as c:
            return (await c.get("/trainers_policy_version")).json()["policy_version"]


def run(coro):
    return asyncio.run(coro)


def _is_immediate_rejection(r: httpx.Response) -> bool:
    """What the published client does not retry: a 400 whose error type is vLLM's BadRequestError
    (``http_errors._is_vllm_invalid_request``) or one its gateway marks as its own."""
    body = r.json()
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    return r.status_code == 400 and (err.get("type") == "BadRequestError"
                                     or r.headers.get("X-Baseten-Error-Source") == "06")


def test_missing_checkpoint_is_a_400_at_submit():
    # TrainingClient.load_state: a 404 at submit is a cold start, retried for ready_timeout
    pair = Pair()

    async def go():
        for path in (f"bt://loops:{pair.trainer.run_id}/weights/no-such-state", "loops://r/weights/missing"):
            for route in ("/load_state", "/load_state_with_optimizer"):
                r = await pair.submit(route, {"path": path, "seq_id": 1})
                assert _is_immediate_rejection(r), (route, r.status_code, r.text)
                assert r.json()["error"].get("field") == "path"

    run(go())


def test_malformed_checkpoint_path_is_already_a_400_at_submit():
    pair = Pair()
    r = run(pair.submit("/load_state", {"path": "s3://somewhere/else"}))
    assert _is_immediate_rejection(r), r.text


def test_bump_version_false_stages_without_hot_swapping():
    # TrainingClient.save_weights_for_sampler sends bump_version: false ("stage ... without making the
    # paired sampler hot-swap"); save_weights_and_get_sampling_client sends true.
    pair = Pair()

    async def go():
        await pair.op("/forward_backward", {"data": [_datum()]})
        await pair.op("/optim_step", {"adam_params": {"learning_rate": 0.01}})
        first = await pair.op("/save_weights_for_sampler", {"name": "live", "bump_version": True})
        assert await pair.sampler_version() == first["version"] == 1
        await pair.op("/forward_backward", {"data": [_datum()]})
        await pair.op("/optim_step", {"adam_params": {"learning_rate": 0.01}})
        staged = await pair.op("/save_weights_for_sampler", {"name": "staged", "bump_version": False})
        assert await pair.sampler_version() == 1, "a staged save hot-swapped the sampler"
        assert staged["version"] == 1 and staged["path"].endswith("/sampler_weights/staged")

    run(go())


def test_image_datum_is_refused_at_submit():
    # An image chunk a text-only engine cannot train on: 400 naming the datum, not 202 and a failed op.
    pair = Pair()
    datum = _datum()
    image = {"type": "image", "data": base64.b64encode(b"\x89PNG...").decode(), "format": "png", "expected_tokens": 2}
    datum["model_input"]["chunks"].append(image)
    n = sum(len(c.get("tokens", [])) for c in datum["model_input"]["chunks"]) + 2
    datum["loss_fn_inputs"]["target_tokens"] = {"data": [-100] * (n - 1) + [21], "dtype": "int64", "shape": [n]}
    r = run(pair.submit("/forward_backward", {"data": [datum], "loss_fn": "cross_entropy"}))
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"].get("field", "").startswith("data[0].model_input")


def _published_aggregate(results: list[dict], sizes: list[int]) -> dict:
    """A transcription of the published client's ``_aggregate_forward_backward`` (training_client.py
    365-412): loss and every metric averaged weighted by chunk datum count. The real function runs
    in tests/test_published_client.py (``TrainingClient.forward[chunked totals]``)."""
    total = sum(sizes)
    loss = sum(r["loss"] * n for r, n in zip(results, sizes)) / total
    keys = {k for r in results for k in r["metrics"]}
    metrics = {}
    for k in keys:
        if k == "skip_token_normalization":
            metrics[k] = float(all(r["metrics"].get(k) == 1.0 for r in results))
            continue
        pairs = [(r["metrics"][k], n) for r, n in zip(results, sizes) if k in r["metrics"]]
        metrics[k] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    return {"loss": loss, "metrics": metrics}


def test_chunked_batch_reports_the_whole_batch_totals_to_the_published_client():
    pair = Pair()
    data = [_datum(n_prompt=p) for p in (3, 5, 8, 2, 6)]  # unequal lengths: token means would not agree

    async def go():
        whole = await pair.op("/forward", {"data": data})
        parts = [await pair.op("/forward", {"data": data[:2]}), await pair.op("/forward", {"data": data[2:]})]
        return whole, _published_aggregate(parts, [2, 3])

    whole, chunked = run(go())
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-9)
    assert set(chunked["metrics"]) == set(whole["metrics"])
    for k, v in whole["metrics"].items():
        assert chunked["metrics"][k] == pytest.approx(v, rel=1e-9), k


def test_forward_returns_top_k_logprobs():
    pair = Pair()
    out = run(pair.op("/forward", {"data": [_datum()], "top_k_logprobs": 3}))
    keys = set(out["loss_fn_outputs"][0])
    assert keys - {"logprobs"}, f"only {keys}: top_k_logprobs ignored"
