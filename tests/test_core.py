"""Unit tests of loops_core: types, errors, futures, plugins, import hygiene."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

import loops_core
from loops_core import (APIFuture, BackendNotFoundError, BackendUnavailableError, Checkpoint, Datum,
                        FutureTimeoutError, ImageChunk, InvalidRequestError, LoopsError, ModelInput,
                        RemoteOpError, SamplingParams, ServerShutdownError, TensorData, UnknownRequestError)
from loops_core.plugins import BackendInfo, collect_backends, get_plugin_manager, load_backend


# ---- types ---------------------------------------------------------------------------------------
def test_tensor_data_checks_shape_and_dtype():
    assert TensorData(data=[1, 2, 3], dtype="int64").shape == [3]
    with pytest.raises(ValueError, match="shape"):
        TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
    with pytest.raises(ValueError, match="int64"):
        TensorData(data=[1.5], dtype="int64", shape=[1])
    with pytest.raises(ValueError):
        TensorData(data=[1], dtype="complex64", shape=[1])
    with pytest.raises(ValueError, match="ragged"):
        TensorData.from_list([[1, 2], [3]], "int64")
    nested = TensorData.from_list([[1, 2], [3, 4]], "int64")
    assert nested.data == [1, 2, 3, 4] and nested.shape == [2, 2]


def test_tensor_data_numpy_torch_round_trip_and_nan_as_null():
    a = np.array([[0.5, np.nan], [1.0, -2.0]], dtype=np.float32)
    td = TensorData.from_numpy(a)
    assert td.dtype == "float32" and td.shape == [2, 2]
    assert td.model_dump(mode="json")["data"][1] is None
    back = TensorData.model_validate_json(td.model_dump_json()).to_numpy()
    assert np.isnan(back[0, 1]) and back[1, 1] == -2.0
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    assert torch.equal(TensorData.from_torch(t).to_torch(), t)
    bf = TensorData.from_torch(torch.tensor([1.5], dtype=torch.bfloat16))
    assert bf.dtype == "bfloat16" and bf.to_torch().dtype == torch.bfloat16


def test_model_input_helpers_and_images():
    mi = ModelInput.from_ints([1, 2]).append_int(3)
    assert mi.to_ints() == [1, 2, 3] and mi.length == 3 and len(mi.chunks) == 2
    img = ImageChunk.from_bytes(b"\x89PNG", "png", expected_tokens=4)
    both = mi.append(img)
    assert both.length == 7
    wire = both.model_dump(mode="json")
    assert wire["chunks"][2]["data"] == "iVBORw=="  # standard base64
    assert ModelInput.model_validate(wire).chunks[2].to_bytes() == b"\x89PNG"
    with pytest.raises(ValueError):
        both.to_ints()


def test_requests_forbid_unknown_fields_responses_ignore_them():
    with pytest.raises(ValueError):
        SamplingParams(max_token=3)
    ckpt = Checkpoint.model_validate({"id": "a", "run_id": "r", "checkpoint_id": "n", "checkpoint_type": "training",
                                      "created_at": "now", "brand_new_field": 1})
    assert ckpt.id == "a"


def test_datum_converts_lists_numpy_and_torch_by_key():
    d = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={
        "target_tokens": [2, 3], "weights": np.array([1.0, 0.0]), "advantages": [0.5, 0.5]})
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    with pytest.raises(ValueError, match="not a known key"):
        Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"mystery": [1]})


# ---- errors ----------------------------------------------------------------------------------------
def test_one_exception_root():
    for cls in (InvalidRequestError, RemoteOpError, UnknownRequestError, ServerShutdownError, FutureTimeoutError,
                BackendNotFoundError, BackendUnavailableError):
        assert issubclass(cls, LoopsError), cls
    assert issubclass(InvalidRequestError, ValueError) and issubclass(FutureTimeoutError, TimeoutError)
    assert RemoteOpError("boom", "ValueError").error_class == "ValueError"
    tree = loops_core.errors.__doc__
    for name in loops_core.errors.__all__:
        assert name in tree, f"{name} is missing from the tree in errors.py's docstring"


# ---- futures ---------------------------------------------------------------------------------------
def test_result_timeout_does_not_spoil_the_future():
    async def slow():
        await asyncio.sleep(0.3)
        return 42

    fut = APIFuture.from_coroutine(slow())
    with pytest.raises(FutureTimeoutError):
        fut.result(timeout=0.01)
    assert fut.result(timeout=5) == 42
    assert fut.future().result() == 42

    async def awaited():
        return await APIFuture.from_coroutine(slow()), await APIFuture.from_coroutine(slow()).coroutine()

    assert asyncio.run(awaited()) == (42, 42)


def test_future_timeout_in_async_code_does_not_cancel_the_operation():
    async def slow():
        await asyncio.sleep(0.3)
        return "done"

    fut = APIFuture.from_coroutine(slow())

    async def main():
        with pytest.raises(FutureTimeoutError):
            await fut.result_async(timeout=0.01)
        return await fut

    assert asyncio.run(main()) == "done"


# ---- plugins -----------------------------------------------------------------------------------
def test_builtin_backends_are_registered_lazily():
    backends = collect_backends(get_plugin_manager(load_entrypoints=False))
    assert {"fake", "local", "modal", "baseten"} <= set(backends)
    assert all(isinstance(b.target, str) for b in backends.values()), "built-ins register as 'module:attr'"


def test_unknown_backend_lists_installed_ones(monkeypatch):
    monkeypatch.setenv("LOOPS_BACKEND", "nope")
    with pytest.raises(BackendNotFoundError) as info:
        loops_core.ServiceClient()
    assert "fake" in str(info.value) and "nope" in str(info.value)


def test_unknown_backend_separates_installed_from_missing_extras():
    class Plugin:
        @loops_core.hookimpl
        def register_backends(self, register):
            register("gpuzilla", "gpuzilla_backend:Backend", extra="gpuzilla", requires=("gpuzilla_sdk_xyz",))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="test-plugin")
    with pytest.raises(BackendNotFoundError) as info:
        load_backend("nope", pm)
    installed = str(info.value).split("Installed backends:")[1].split(";")[0]
    assert "fake" in installed and "gpuzilla" not in installed
    assert "gpuzilla needs: pip install -e '.[gpuzilla]'" in str(info.value)


def test_missing_extra_names_the_pip_command():
    info = BackendInfo("gpuzilla", "gpuzilla_backend:Backend", extra="gpuzilla", requires=("gpuzilla_sdk_xyz",))
    with pytest.raises(BackendUnavailableError) as exc:
        info.load()
    assert "pip install -e '.[gpuzilla]'" in str(exc.value) and "gpuzilla_sdk_xyz" in str(exc.value)


def test_third_party_backend_through_the_hook(monkeypatch):
    from loops_backends.fake.backend import FakeBackend

    from loops_core import hookimpl

    class MyBackend(FakeBackend):
        name = "mine"

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register("mine", MyBackend, description="a test plugin")

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="test-plugin")
    assert load_backend("mine", pm) is MyBackend
    monkeypatch.setenv("LOOPS_BACKEND", "fake")  # read when a client is built, not at import
    assert loops_core.ServiceClient().backend_name == "fake"


def test_backend_selection_order(monkeypatch):
    monkeypatch.setenv("LOOPS_BACKEND", "fake")
    from loops_core.plugins import resolve_backend_name

    assert resolve_backend_name() == "fake"
    assert resolve_backend_name("local") == "local"
    monkeypatch.delenv("LOOPS_BACKEND")
    assert resolve_backend_name() == "local"


def test_import_loops_core_imports_no_heavy_framework():
    code = ("import sys, loops_core, loops_core.testing.plugin, loops_backends.fake.backend, loops_backends.local_gpu;"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm', 'modal') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_lists_backends():
    r = subprocess.run([sys.executable, "-m", "loops_core.cli", "backends"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "fake" in r.stdout and "local" in r.stdout and "modal" in r.stdout
    r = subprocess.run([sys.executable, "-m", "loops_core.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serve" in r.stdout


def test_all_is_sorted_and_complete():
    assert loops_core.__all__ == sorted(loops_core.__all__)
    for name in loops_core.__all__:
        assert hasattr(loops_core, name), name


def test_pickled_sampling_client_carries_no_key(monkeypatch):
    import pickle

    from loops_core import AuthenticationError, SamplingClient
    from loops_core.wire import Endpoint

    secret = "k3y-" + "x" * 28
    sc = SamplingClient(Endpoint(url="http://127.0.0.1:9", api_key=secret, api_key_env="MY_LOOPS_KEY"),
                        base_model="m")
    blob = pickle.dumps(sc)
    assert secret.encode() not in blob
    monkeypatch.delenv("MY_LOOPS_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="MY_LOOPS_KEY"):
        pickle.loads(blob)
    monkeypatch.setenv("MY_LOOPS_KEY", secret)
    assert pickle.loads(blob)._endpoint.api_key == secret
