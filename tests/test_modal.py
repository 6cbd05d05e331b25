"""The Modal backend, without a Modal account.

What runs here, and against what:

* the container classes (``LoopsTrainer`` / ``LoopsSampler``) run in this process through Modal's
  own local execution path, ``Cls().web.local()`` (real ``modal`` package, no token);
* provisioning (``ModalBackend``) runs against ``ModalStandIn``, an in-process stand-in for the
  part of Modal it uses: containers are our server apps on loopback, the Volume a directory;
* the whole contract suite runs through that stand-in (fake engine), on the ``modal`` backend
  only: this module's ``LOOPS_CONTRACT_BACKENDS`` pins ``backend_name`` (tests/test_contract.py keeps
  its own selection);
* one path runs the torch trainer and HF sampler through the stand-in (needs torch).

Nothing here reaches Modal's servers; see the README for running against real Modal.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings

import httpx
import pytest

pytest.importorskip("modal")

from loops_backends.modal import standin as standin_module  # noqa: E402
from loops_backends.modal.container import ContainerConfig, ContainerSpec, VolumeCheckpointStore  # noqa: E402
from loops_backends.modal.settings import ModalSettings, modal_credentials_present  # noqa: E402
from loops_backends.modal.standin import LoopbackServer, ModalStandIn  # noqa: E402
from loops_core import (AdamParams, AuthenticationError, BackendUnavailableError, InvalidRequestError,  # noqa: E402
                        ModelInput, SamplingParams, ServiceClient)
from loops_core.testing.contract.data import france, sft_datum  # noqa: E402


LOOPS_CONTRACT_BACKENDS = ["modal"]  # the contract plugin runs this module's imported tests on modal alone


@pytest.fixture
def no_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any active stand-in (the contract suite's lives for the whole session)."""
    monkeypatch.setattr(standin_module, "_ACTIVE", [])


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path, no_standin) -> None:  # noqa: ANN001
    for var in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH", "MODAL_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


# ---- credentials, extras, settings ------------------------------------------------------------------
def test_modal_without_token_fails_at_construction(no_token, monkeypatch):
    monkeypatch.setenv("LOOPS_BACKEND", "modal")
    with pytest.raises(AuthenticationError, match="modal token new"):
        ServiceClient()


def test_modal_token_detection(no_token, tmp_path, monkeypatch):
    assert not modal_credentials_present()
    (tmp_path / ".modal.toml").write_text('[me]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    assert modal_credentials_present()
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "elsewhere.toml"))
    assert not modal_credentials_present()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-2")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-2")
    assert modal_credentials_present()


def test_missing_modal_package_names_the_extra(monkeypatch):
    import importlib.util

    from loops_backends.modal import platform

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modal" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[modal\]'"):
        ServiceClient(backend="modal")
    monkeypatch.setitem(sys.modules, "modal", None)  # `import modal` now fails
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[modal\]'"):
        platform.import_modal()


def test_import_loops_core_does_not_import_modal():
    code = "import loops_core, sys; assert 'modal' not in sys.modules; import loops_backends.modal.backend; " \
           "assert 'modal' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("LOOPS_MODAL_GPU", "A100-80GB")
    assert ModalSettings.resolve({}).gpu == "A100-80GB"
    monkeypatch.setenv("LOOPS_MODAL_GPU", "L40S")
    s = ModalSettings.resolve({})
    assert s.gpu == s.sampler_gpu == "L40S"
    assert ModalSettings.resolve({"gpu": "H200", "sampler_gpu": "L4"}).sampler_gpu == "L4"
    monkeypatch.delenv("LOOPS_MODAL_GPU")
    assert ModalSettings.resolve({}).gpu == "H100"
    assert ModalSettings.resolve({"engine": "fake"}).gpu is None  # the numpy engine needs no GPU
    with pytest.raises(InvalidRequestError, match="gpus"):
        ModalSettings.resolve({"gpus": "H100"})
    with pytest.raises(InvalidRequestError):
        ModalSettings.resolve({"scaledown": 0})


def test_container_config_travels_as_env():
    c = ContainerConfig(role="trainer", base_model="Qwen/Qwen3-0.6B", run_id="run-1", api_key="k", rank=16, seed=3,
                        sampler_url="https://x--loops-sampler.modal.run")
    env = c.to_env()
    assert env["LOOPS_API_KEY"] == "k" and env["LOOPS_MODAL_RANK"] == "16"
    assert ContainerConfig.from_env(env) == c
    with pytest.raises(RuntimeError, match="LOOPS_MODAL_ROLE"):
        ContainerConfig.from_env({})


# ---- the Modal app, and its containers through Modal's local execution path ------------------------
def test_app_definition():
    from loops_backends.modal import app as modal_app

    cfg = ContainerConfig(role="trainer", base_model="Qwen/Qwen3-0.6B", run_id="run-1", api_key="k")
    built = modal_app.build_app(ContainerSpec("loops-test-1-trainer", cfg, gpu="H100", scaledown=120, hf_token="hf_x"))
    o = built.options
    assert o["gpu"] == "H100" and o["scaledown_window"] == 120 and o["max_containers"] == 1
    assert set(o["volumes"]) == {"/loops-volume", "/root/.cache/huggingface"}
    assert len(o["secrets"]) == 2  # the configuration (API key included) and HF_TOKEN
    assert any(p.startswith("torch") for p in modal_app.image_packages("trainer", "local"))
    assert any(p.startswith("vllm") for p in modal_app.image_packages("sampler", "local"))
    assert not any(p.startswith(("torch", "vllm")) for p in modal_app.image_packages("sampler", "fake"))


def _local_container(role: str, config: ContainerConfig, monkeypatch: pytest.MonkeyPatch):
    """Modal's local execution path: ``Cls().web.local()`` runs @enter here and returns the ASGI app."""
    from loops_backends.modal import app as modal_app

    built = modal_app.build_app(ContainerSpec(f"loops-test-{role}", config, gpu=None, scaledown=60))
    for k, v in config.to_env().items():  # what the secret does in a real container
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "executing locally ... no mounted Volume"
        return built.cls().web.local()


def test_container_entrypoints_run_through_modal_local(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPS_HOME", str(tmp_path))
    key = "test-key"
    common = dict(base_model="loops/tiny-qwen3", run_id="run-local", api_key=key, engine="fake")
    sampler = LoopbackServer(_local_container("sampler", ContainerConfig(role="sampler", **common), monkeypatch))
    trainer = LoopbackServer(_local_container(
        "trainer", ContainerConfig(role="trainer", rank=4, seed=0, sampler_url=sampler.url, **common), monkeypatch))
    try:
        assert httpx.get(trainer.url + "/get_info").status_code == 401  # the API key is required
        assert httpx.get(trainer.url + "/health").json()["status"] == "ok"
        with ServiceClient.local(trainer_url=trainer.url, sampler_url=sampler.url, api_key=key) as service:
            tc = service.create_lora_training_client("loops/tiny-qwen3", rank=4, seed=0)
            datum = sft_datum(*france(tc.get_tokenizer()))
            tc.forward_backward([datum]).result(timeout=60)
            tc.optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60)
            sc = tc.save_weights_and_get_sampling_client("local-path").result(timeout=60)
            out = sc.sample(ModelInput.from_ints([1, 2, 3]), 1, SamplingParams(max_tokens=3, seed=0))
            assert out.policy_version == 1 and len(out.sequences[0].tokens) == 3
        assert (tmp_path / "modal-local-volume" / "runs" / tc.run_id / "sampler_weights" / "local-path").is_dir()
    finally:
        trainer.stop()
        sampler.stop()


# ---- the Volume hand-off ------------------------------------------------------------------------------
class RecordingVolume:
    def __init__(self):
        self.calls: list[str] = []

    def commit(self):
        self.calls.append("commit")

    def reload(self):
        self.calls.append("reload")


def test_store_commits_after_writes_and_reloads_before_reads(tmp_path):
    vol = RecordingVolume()
    store = VolumeCheckpointStore("/loops-volume", volume=vol, local=tmp_path)
    directory, ckpt = store.create("run-1", "sampler_weights", "v1", base_model="m", lora_rank=4,
                                   write=lambda d: (d / "adapter_config.json").write_text("{}"))
    assert vol.calls == ["commit"]
    assert str(directory) == "/loops-volume/runs/run-1/sampler_weights/v1"  # valid in every container
    assert store.resolve(str(directory)) == tmp_path / "runs/run-1/sampler_weights/v1"
    assert store.resolve(ckpt.path) == tmp_path / "runs/run-1/sampler_weights/v1"
    assert vol.calls == ["commit", "reload", "reload"]


def test_standin_volume_shows_only_committed_files(tmp_path):
    si = ModalStandIn(root=tmp_path)
    writer, reader = si.volume.view(tmp_path / "a"), si.volume.view(tmp_path / "b")
    (writer.dir / "f.txt").write_text("one")
    reader.reload()
    assert not (reader.dir / "f.txt").exists()
    writer.commit()
    assert not (reader.dir / "f.txt").exists()  # committed, but the reader has not reloaded
    reader.reload()
    assert (reader.dir / "f.txt").read_text() == "one"
    (writer.dir / "f.txt").unlink()
    writer.commit()
    reader.reload()
    assert not (reader.dir / "f.txt").exists()


# ---- provisioning through the stand-in ------------------------------------------------------------------
def test_provisioning_through_the_standin(monkeypatch):
    monkeypatch.setenv("LOOPS_MODAL_GPU", "A100-80GB")
    monkeypatch.setenv("LOOPS_MODAL_SCALEDOWN", "300")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with ModalStandIn().active() as si:
        service = ServiceClient(backend="modal")
        tc = service.create_lora_training_client("loops/tiny-qwen3", rank=4, seed=0)
        sampler_spec, trainer_spec = si.specs
        assert (sampler_spec.role, trainer_spec.role) == ("sampler", "trainer")
        assert trainer_spec.gpu == sampler_spec.gpu == "A100-80GB" and trainer_spec.scaledown == 300
        assert trainer_spec.hf_token == "hf_secret"
        key = trainer_spec.config.api_key
        assert key and key == sampler_spec.config.api_key and len(key) >= 32
        sampler_url = si.running[0].http.url
        assert trainer_spec.config.sampler_url == sampler_url
        assert httpx.post(tc._wire.url + "/optim_step", json={}).status_code == 401  # not open to the internet
        assert httpx.get(sampler_url + "/v1/models").status_code == 401

        caps = service.get_server_capabilities()
        assert caps.supported_models[0].gpu_classes[0] == "A100-80GB" and "H100" in caps.supported_models[0].gpu_classes

        saved = tc.save_state("s1").result(timeout=60)
        assert [c.path for c in service.list_checkpoints(tc.run_id)] == [saved.path]
        files = service.get_checkpoint_archive_url(f"{tc.run_id}/weights/s1")
        assert files.total_count >= 2 and all(f.url.startswith("file://") for f in files.presigned_urls)
        with pytest.raises(InvalidRequestError):
            service.create_sampling_client(model_path="/some/dir")  # on Modal: checkpoint URIs only

        service.close()
        assert si.running == []  # teardown stopped both containers
        with pytest.raises(httpx.ConnectError):
            httpx.get(sampler_url + "/health")


def test_reuse_from_session_id(monkeypatch):
    with ModalStandIn().active() as si:
        first = ServiceClient(backend="modal", detach=True)
        tc = first.create_lora_training_client("loops/tiny-qwen3", rank=4)
        first.close()
        assert len(si.running) == 2  # detached: the apps outlive the session
        second = ServiceClient(backend="modal", reuse_from_session_id=first.session_id)
        again = second.create_lora_training_client("loops/tiny-qwen3", rank=4)
        assert again.run_id == tc.run_id and len(si.specs) == 2  # no new containers
        second.close()
        assert si.running == []  # the reusing session was not detached: the pair stops with it
        with pytest.warns(RuntimeWarning, match="no Modal session"):
            ServiceClient(backend="modal", reuse_from_session_id="modal-unknown").close()


def test_torch_engine_through_the_standin():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    with ModalStandIn(engine=None).active() as si:
        service = ServiceClient(backend="modal", sampler_engine="hf")
        tc = service.create_lora_training_client("loops/tiny-qwen3", rank=4, seed=0)
        assert {s.config.engine for s in si.specs} == {"local"}
        datum = sft_datum(*france(tc.get_tokenizer()))
        losses = []
        for _ in range(3):
            losses.append(tc.forward_backward([datum]).result(timeout=120).loss)
            tc.optim_step(AdamParams(learning_rate=5e-2)).result(timeout=120)
        assert losses[-1] < losses[0]
        sc = tc.save_weights_and_get_sampling_client("torch-1").result(timeout=120)
        out = sc.sample(ModelInput.from_ints(datum.model_input.to_ints()[:4]), 1, SamplingParams(max_tokens=2, seed=0))
        assert out.policy_version == 1 and len(out.sequences[0].tokens) == 2
        service.close()


def test_standin_records_are_plain_json(tmp_path):
    async def run():
        si = ModalStandIn(root=tmp_path)
        await si.put_record("s", {"pairs": [{"run_id": "r"}]})
        return await si.get_record("s")

    assert json.loads(json.dumps(asyncio.run(run()))) == {"pairs": [{"run_id": "r"}]}


# The contract suite, through the stand-in (ModalBackend.contract_environment). Imported last so
# the tests above run before its session-long ServiceClient exists.
from loops_core.testing.contract.test_bad_input import *  # noqa: E402,F401,F403
from loops_core.testing.contract.test_checkpoints import *  # noqa: E402,F401,F403
from loops_core.testing.contract.test_sampling import *  # noqa: E402,F401,F403
from loops_core.testing.contract.test_surface import *  # noqa: E402,F401,F403
from loops_core.testing.contract.test_training import *  # noqa: E402,F401,F403
