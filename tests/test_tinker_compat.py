"""The ``tinker`` shim on the fake backend: Tinker's own types (converted to loops' at one boundary),
Tinker's conventions (futures, deprecated twins, backcompat client futures, tinker:// paths),
Tinker's errors raised for real with Tinker's constructors, the REST client, and the two
Tinker-style examples run unchanged as subprocesses. Field-for-field fidelity with the real SDK is
``test_tinker_surface.py``."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import inspect
import json
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import httpx

import loops_core
import tinker
from tinker import _convert as convert
from tinker import types

ROOT = Path(__file__).resolve().parents[1]
MODEL = "loops/tiny-qwen3"  # any name works on fake; the examples use this one everywhere


@pytest.fixture
def service(monkeypatch):
    monkeypatch.setenv("LOOPS_BACKEND", "fake")
    client = tinker.ServiceClient()
    yield client
    client.close("success").result()


@pytest.fixture
def tc(service):
    return service.create_lora_training_client(MODEL, rank=4, seed=0, user_metadata={"renderer_name": "role_colon"}
                                               ).result()


def datum(ids: list[int], **extra) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1), **extra})


IDS = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


# ---- types --------------------------------------------------------------------------------------

def test_types_are_tinkers_frozen_and_convert_at_one_boundary():
    for name in ("Datum", "TensorData", "SampleResponse", "SampledSequence", "ForwardBackwardOutput",
                 "PromptProvenanceSpan", "SampledProvenanceSpan"):
        cls = getattr(types, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert cls is not getattr(loops_core, name, None)
    d = datum(IDS)
    assert not hasattr(d, "model_dump")  # nothing the real Tinker Datum lacks
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.model_input = types.ModelInput.empty()
    spans = [types.PromptProvenanceSpan(sequence_id="s", length=len(IDS) - 1)]
    spanned = dataclasses.replace(d, model_input_spans=spans, loss_fn_input_spans=spans)  # as the cookbook does
    with pytest.raises(pydantic_error()):
        types.SamplingParams(max_tokens=1).max_tokens = 2  # pydantic types are frozen too
    sent = convert.to_loops_datum(spanned)
    assert isinstance(sent, loops_core.Datum) and sent.model_input.to_ints() == IDS[:-1]
    assert sent.loss_fn_inputs["target_tokens"].data == IDS[1:] and sent.loss_fn_inputs["weights"].dtype == "float32"
    assert sent.model_input_spans[0].type == "prompt"
    from tinker.lib.public_interfaces.rest_client import RestClient
    from tinker.types.tensor_data import TensorData
    assert TensorData is types.TensorData and RestClient is tinker.RestClient


def pydantic_error() -> type[Exception]:
    import pydantic
    return pydantic.ValidationError


def test_adam_params_default_to_no_clipping_and_convert_to_loops():
    p = tinker.AdamParams(learning_rate=1e-3)
    assert p.grad_clip_norm == 0.0 and loops_core.AdamParams().grad_clip_norm == 1.0
    sent = convert.to_loops_adam(p)
    assert isinstance(sent, loops_core.AdamParams) and sent.grad_clip_norm == 0.0 and sent.learning_rate == 1e-3
    assert types.LoraConfig(rank=8).train_unembed is True
    with pytest.raises(ValueError):
        tinker.AdamParams(learnin_rate=1e-3)  # unknown fields fail fast, as for every request type


def test_datum_converts_torch_numpy_lists_and_sparse_tensors():
    torch = pytest.importorskip("torch")
    d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": torch.tensor([2, 3, 4]), "weights": np.ones(3),
                                    "advantages": [0.5, 0.5, 0.5]})
    assert [d.loss_fn_inputs[k].dtype for k in ("target_tokens", "weights", "advantages")] == \
        ["int64", "float32", "float32"]
    dense = torch.zeros(6, 5, dtype=torch.long)
    dense[1, 2], dense[4, 0] = 7, 9
    sparse = types.TensorData.from_torch_sparse(dense)
    assert sparse.sparse_crow_indices == [0, 0, 1, 1, 1, 2, 2] and sparse.sparse_col_indices == [2, 0]
    assert sparse.data == [7, 9] and torch.equal(sparse.to_torch(), dense)
    assert sparse.tolist(pad_value=-1)[1] == [-1, -1, 7, -1, -1]
    back = convert.from_loops_tensor(convert.to_loops_tensor(sparse))
    assert back.sparse_crow_indices == sparse.sparse_crow_indices and np.array_equal(back.to_numpy(), dense.numpy())
    assert types.TensorData.from_torch_sparse(torch.ones(2, 2)).sparse_crow_indices is None  # dense is smaller
    assert types.TensorData(data=np.arange(4), dtype="int64", shape=[2, 2]).tolist() == [[0, 1], [2, 3]]


# ---- errors ---------------------------------------------------------------------------------------

def test_exception_tree_and_constructors_are_tinkers():
    assert issubclass(tinker.BadRequestError, tinker.APIStatusError)
    assert issubclass(tinker.APIStatusError, tinker.APIError) and issubclass(tinker.APIError, tinker.TinkerError)
    assert issubclass(tinker.APITimeoutError, tinker.APIConnectionError)
    assert issubclass(tinker.RequestFailedError, tinker.TinkerError)
    assert not issubclass(tinker.RequestFailedError, tinker.APIError)
    assert not issubclass(tinker.TinkerError, loops_core.LoopsError)  # Tinker's classes only
    request = httpx.Request("POST", "http://x.invalid/sample")
    response = httpx.Response(404, request=request)
    e = tinker.NotFoundError("gone", response, {"detail": "gone"})
    assert (e.status_code, e.response, e.request, e.body, e.message) == (404, response, request, {"detail": "gone"},
                                                                         "gone")
    conn = tinker.APIConnectionError(request=request)
    assert conn.message == "Connection error." and tinker.APITimeoutError(request).message == "Request timed out."
    failed = tinker.RequestFailedError("boom", "op-1", types.RequestErrorCategory.User)
    back = pickle.loads(pickle.dumps(failed))
    assert (type(back), str(back), back.request_id, back.category) == \
        (tinker.RequestFailedError, "boom", "op-1", "user")


def test_tinker_errors_are_raised_for_real_on_fake(service, tc, tmp_path):
    # an invalid request -> BadRequestError (found by the client: unknown loss; by the server: token id, below)
    with pytest.raises(tinker.BadRequestError, match="loss_fn"):
        tc.forward_backward([datum(IDS)], "no_such_loss").result()
    # an unknown checkpoint -> NotFoundError
    with pytest.raises(tinker.NotFoundError):
        service.create_training_client_from_state(f"tinker://{tc.model_id}/weights/never-saved").result()
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient().get_training_run("no-such-run").result()
    # a failed operation -> RequestFailedError (the server accepted load_state; the rank does not fit)
    path = tc.save_state("rank4").result().path
    other = service.create_lora_training_client(MODEL, rank=8).result()
    with pytest.warns(FutureWarning, match="load_state"):
        future = other.load_state(path)
    with pytest.raises(tinker.RequestFailedError, match="rank") as e:
        future.result()
    assert e.value.category == "user" and e.value.request_id
    # (last on this client: a submission the server rejects leaves a gap in its operation order)
    with pytest.raises(tinker.BadRequestError, match="vocabulary") as e:
        other.forward([datum([1, 2, 10**6])], "cross_entropy").result()
    assert e.value.status_code == 400 and isinstance(e.value.__cause__, loops_core.InvalidRequestError)
    # an unreachable server -> APIConnectionError (a handle naming a port nobody listens on)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = base64.urlsafe_b64encode(json.dumps({"url": f"http://127.0.0.1:{port}", "base_model": MODEL,
                                                  "ready_timeout": 0.5}).encode()).decode()
    client = tinker.SamplingClient.from_sampler_handle(handle)
    with pytest.raises(tinker.APIConnectionError, match="cannot reach"):
        client.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()


def test_arguments_the_shim_rejects(service, tc):
    with pytest.raises(tinker.BadRequestError, match="At least one"):
        service.create_lora_training_client(MODEL, train_mlp=False, train_attn=False, train_unembed=False)
    with pytest.raises(tinker.BadRequestError, match="attention and MLP"):
        service.create_lora_training_client(MODEL, train_attn=False)
    with pytest.raises(tinker.BadRequestError, match="AdamW"):
        service.create_lora_training_client(MODEL, optimizer=types.DimuonOptimizerConfig())
    with pytest.raises(tinker.BadRequestError, match="not both"):
        tc.optim_step(tinker.AdamParams(), adam_params=tinker.AdamParams())
    with pytest.raises(tinker.BadRequestError, match="AdamW"):
        tc.optim_step(types.DimuonParams(learning_rate=0.1))
    with pytest.raises(tinker.BadRequestError, match="inflight"):
        tc.save_weights_and_get_sampling_client(kind="inflight")
    with pytest.raises(TypeError):
        tc.forward_backward([datum(IDS)])  # loss_fn is required, as in Tinker


# ---- futures and the sync/async convention ----------------------------------------------------------

def test_service_client_keywords(monkeypatch):
    monkeypatch.setenv("LOOPS_BACKEND", "fake")
    with pytest.warns(FutureWarning, match="max_retries"):
        tinker.ServiceClient(max_retries=3).close("success").result()
    with pytest.warns(UserWarning, match="LOOPS_BACKEND"):
        with tinker.ServiceClient(base_url="http://example.invalid", api_key="tml-x") as sc:
            assert sc.holder.backend_name == "fake"


def test_client_futures_work_as_clients_with_a_warning(service):
    future = service.create_lora_training_client(MODEL, rank=4)
    assert isinstance(future, tinker.BackcompatTrainingClientFuture)
    assert isinstance(future, tinker.APIFuture) and isinstance(future, tinker.TrainingClient)
    with pytest.warns(FutureWarning, match="future as the TrainingClient"):
        out = future.forward_backward([datum(IDS)], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0
    with pytest.warns(FutureWarning):
        assert future.model_id == future.result().model_id
    sampler = future.result().save_weights_and_get_sampling_client()
    assert isinstance(sampler, tinker.BackcompatSamplingClientFuture) and isinstance(sampler, tinker.SamplingClient)
    with pytest.warns(FutureWarning, match="future as the SamplingClient"):
        assert sampler.get_base_model() == MODEL
    assert isinstance(sampler.result(), tinker.SamplingClient)


def test_every_method_returns_an_api_future(tc):
    d = datum(IDS)
    fb = tc.forward_backward([d], "cross_entropy")
    opt = tc.optim_step(adam_params=tinker.AdamParams(learning_rate=0.1))  # the legacy keyword
    assert isinstance(fb, tinker.APIFuture) and isinstance(fb.future(), concurrent.futures.Future)
    first = fb.result()
    assert opt.result().metrics["learning_rate:mean"] == 0.1 and fb.future().done()
    assert all(k.count(":") == 1 for k in first.metrics)  # Tinker's name:reduction keys
    assert first.loss_fn_outputs[0]["logprobs"].dtype == "float32"

    async def main():
        out = await tc.forward([d], "cross_entropy")  # await a future directly
        both = await asyncio.gather(tc.forward([d], "cross_entropy").coroutine(),
                                    tc.forward([d], "cross_entropy"))
        with pytest.warns(FutureWarning, match="forward_backward_async"):
            fut = await tc.forward_backward_async([d], "cross_entropy")  # the twin returns the future
        assert isinstance(fut, tinker.APIFuture)
        await fut.result_async(timeout=30)
        with pytest.warns(FutureWarning, match="create_sampling_client_async"):
            sc = await tc.create_sampling_client_async(tc.save_weights_for_sampler("a").result().path)
        assert isinstance(sc, tinker.SamplingClient)  # the others return the value
        return out, both

    out, both = asyncio.run(main())
    assert out.metrics["loss:sum"] < first.metrics["loss:sum"]  # the optim step was applied
    assert both[0].metrics == both[1].metrics == out.metrics


# ---- training, checkpoints, sampling --------------------------------------------------------------------

def test_paths_are_tinker_paths_and_are_accepted(service, tc):
    state = tc.save_state("s1", user_metadata={"step": "1"}).result()
    assert state.path == f"tinker://{tc.model_id}/weights/s1"
    with pytest.raises(tinker.ConflictError):
        tc.save_state("s1").result()  # found when the save runs, as on Tinker (a 409 from the server)
    tc.save_state("s1", overwrite=True).result()
    sampler_ckpt = tc.save_weights_for_sampler("w1").result()
    assert sampler_ckpt.path == f"tinker://{tc.model_id}/sampler_weights/w1"
    assert tc.save_weights_external("w2").result().path.startswith(f"tinker://{tc.model_id}/sampler_weights/")
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(state.path)
    assert (parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id) == (tc.model_id, "training",
                                                                                     "weights/s1")
    resumed = service.create_training_client_from_state(state.path).result()
    assert resumed.model_id != tc.model_id and resumed.get_info().lora_rank == 4
    sc = service.create_sampling_client(model_path=sampler_ckpt.path).result()
    assert sc.get_base_model() == MODEL
    with pytest.raises(tinker.BadRequestError, match="sampler checkpoint"):
        service.create_training_client_from_state(sampler_ckpt.path).result()


def test_sampling(tc):
    sc = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = types.ModelInput.from_ints(IDS[:6])
    future = sc.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=5, seed=1),
                       include_prompt_logprobs=True, topk_prompt_logprobs=2)
    assert isinstance(future, tinker.APIFuture)
    out = future.result()
    assert len(out.sequences) == 3 and len({s.sequence_id for s in out.sequences}) == 3
    for s in out.sequences:
        assert s.stop_reason in ("stop", "length") and len(s.tokens) == len(s.logprobs)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 6
    assert all(len(k) == 2 for k in out.topk_prompt_logprobs[1:])
    last = sc.sample(prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                     prompt_logprobs_last_n=2).result()
    assert last.prompt_logprobs[:4] == [None] * 4 and last.prompt_logprobs[4:] == out.prompt_logprobs[4:]
    scored = sc.compute_logprobs(prompt)
    assert isinstance(scored, tinker.APIFuture) and scored.result() == out.prompt_logprobs
    stopped = sc.sample(prompt, 1, types.SamplingParams(max_tokens=20, temperature=0.0,
                                                        stop=[out.sequences[0].tokens[0]])).result()
    assert stopped.sequences[0].stop_reason in ("stop", "length")
    assert out.prompt_cache_hit_tokens >= 0 and isinstance(out.prompt_cache_hit_tokens, int)
    assert out.sequences[0].tokens_np.dtype == np.int32 and out.prompt_logprobs_np.shape == (6,)
    assert out.sequences[0].topk_logprobs is None  # not requested
    if "topk_sample_logprobs" in inspect.signature(loops_core.SamplingClient.sample_async).parameters:
        topk = sc.sample(prompt, 1, types.SamplingParams(max_tokens=3), topk_sample_logprobs=2).result()
        assert all(len(pos) <= 2 for pos in topk.sequences[0].topk_logprobs)
    else:  # forwarded once loops_core's SamplingClient takes it; until then a clear 400 naming it
        with pytest.raises(tinker.BadRequestError, match="topk_sample_logprobs"):
            sc.sample(prompt, 1, types.SamplingParams(max_tokens=1), topk_sample_logprobs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone = pickle.loads(pickle.dumps(sc))
    again = clone.sample(prompt, 3, types.SamplingParams(max_tokens=5, seed=1)).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in out.sequences]
    assert clone.record_stability_info and sc.get_tokenizer() is not None
    with pytest.warns(FutureWarning, match="sample_async"):
        asyncio.run(sc.sample_async(prompt, 1, types.SamplingParams(max_tokens=1)))


def test_custom_loss_sees_the_full_datums(tc):
    torch = pytest.importorskip("torch")
    d = datum(IDS, advantages=[2.0] * (len(IDS) - 1))
    seen = {}

    def loss_fn(data, logprobs):
        seen["keys"] = set(data[0].loss_fn_inputs)
        adv = torch.tensor(data[0].loss_fn_inputs["advantages"].data)
        loss = -(adv * logprobs[0]).sum()
        return loss, {"custom:sum": float(loss.detach())}

    out = tc.forward_backward_custom([d], loss_fn).result()
    assert seen["keys"] == {"target_tokens", "weights", "advantages"}
    assert out.metrics["custom:sum"] == pytest.approx(out.metrics["loss:sum"]) and "surrogate_loss:sum" in out.metrics


def test_gspo_and_stable_reinforce_through_the_shim(tc):
    sc = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = IDS[:5]
    seq = sc.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=4)).result().sequences[0]
    n_p, n_s, sid = len(prompt), len(seq.tokens), seq.sequence_id
    inputs = {"target_tokens": (prompt + seq.tokens)[1:], "logprobs": [0.0] * (n_p - 1) + seq.logprobs,
              "advantages": [0.0] * (n_p - 1) + [1.0] * n_s}
    plain = types.Datum(model_input=types.ModelInput.from_ints((prompt + seq.tokens)[:-1]), loss_fn_inputs=inputs)
    with pytest.raises(tinker.BadRequestError, match="provenance"):
        tc.forward_backward([plain], "stable_reinforce").result()
    spanned = plain.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=n_p),
                     types.SampledProvenanceSpan(sequence_id=sid, length=n_s - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_p - 1),
                        types.SampledProvenanceSpan(sequence_id=sid, length=n_s)])
    out = tc.forward_backward([spanned], "stable_reinforce", {"kl_coeff": 0.05}).result()
    assert out.metrics["ratio:mean"] == pytest.approx(1.0) and out.metrics["sampler_kl:mean"] == pytest.approx(0.0)
    masked = types.Datum(model_input=plain.model_input,
                         loss_fn_inputs={**inputs, "sequence_ratio_mask": [0.0] * (n_p - 1) + [1.0] * n_s})
    out = tc.forward_backward([masked], "gspo").result()
    assert out.metrics["ratio:mean"] == pytest.approx(1.0) and out.metrics["clip_fraction:mean"] == 0.0


# ---- REST ----------------------------------------------------------------------------------------------------

def test_rest_client_runs_and_checkpoints(service, tc):
    state = tc.save_state("r1", user_metadata={"k": "v"}).result()
    tc.save_weights_for_sampler("r2").result()
    rest = tinker.RestClient()
    run = rest.get_training_run_by_tinker_path(state.path).result()
    assert run.user_metadata == {"renderer_name": "role_colon"} and run.base_model == MODEL and run.lora_rank == 4
    assert run.last_checkpoint.tinker_path == state.path
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type) for c in listed} == {("weights/r1", "training"),
                                                                      ("sampler_weights/r2", "sampler")}
    assert next(c for c in listed if c.checkpoint_id == "weights/r1").user_metadata == {"k": "v"}
    urls = rest.get_external_weights_urls(f"tinker://{tc.model_id}/sampler_weights/r2").result().urls
    assert "adapter_config.json" in urls and urls["adapter_config.json"].startswith("file://")
    info = rest.get_weights_info_by_tinker_path(state.path).result()
    assert info.lora_rank == 4 and info.train_unembed is False
    assert any(r.training_run_id == tc.model_id for r in rest.list_training_runs().result().training_runs)
    with pytest.warns(FutureWarning, match="create_rest_client"):
        shared = service.create_rest_client()
    if hasattr(loops_core.ServiceClient, "delete_checkpoint_async"):
        shared.delete_checkpoint_from_tinker_path(state.path).result()
        left = shared.list_checkpoints(tc.model_id).result().checkpoints
        assert [c.checkpoint_id for c in left] == ["sampler_weights/r2"]
        with pytest.raises(tinker.NotFoundError):
            shared.delete_checkpoint_from_tinker_path(state.path).result()
    else:  # the shim deletes only through loops_core's public API
        with pytest.raises(tinker.BadRequestError, match="delete_checkpoint"):
            shared.delete_checkpoint_from_tinker_path(state.path).result()
    with pytest.raises(NotImplementedError, match="billing"):
        tinker.AdminClient().get_billing_usage("2026-01-01", "2026-02-01")
    assert rest.get_server_capabilities().result().supported_models
    with pytest.warns(FutureWarning):
        assert service.get_server_capabilities().supported_models


# ---- the examples, unchanged, as subprocesses ------------------------------------------------------------------

def run_example(name: str, *args: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tinker" / name), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "LOOPS_BACKEND": "fake", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sl_loop_example_runs_on_fake():
    out = run_example("sl_loop.py")
    first, last = map(float, out.rsplit("nll/token first", 1)[1].split("last"))
    assert last < first
    assert "saved state   tinker://" in out and "/weights/final" in out and "/sampler_weights/final" in out
    assert "user_metadata {'recipe': 'sl_loop'}" in out
    gap = float(out.split("max |trainer - sampler logprob|")[1].split()[0])
    assert gap < 1e-5  # the sampler serves exactly the trained weights


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "stable_reinforce"])
def test_rl_loop_example_runs_on_fake(loss_fn):
    out = run_example("rl_loop.py", loss_fn, TINKER_EXAMPLE_LR="0.2", TINKER_EXAMPLE_STEPS="9")
    first, last = map(float, out.rsplit("reward first", 1)[1].split("last"))
    assert last > first  # the policy learned to say more vowels
    assert "compute_logprobs vs sampled logprobs: 0.0e+00" in out
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-5 for line in out.splitlines() if "max |trainer" in line)
