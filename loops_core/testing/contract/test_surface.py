"""Contract: the public surface of the seed reference exists, has sync/async parity, and every
public method is exercised somewhere in this suite (checked by reading the suite's own source)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from loops_core import SamplingClient, ServiceClient, TrainingClient

SEED_SURFACE = {
    ServiceClient: ["create_lora_training_client", "create_sampling_client", "get_server_capabilities",
                    "list_checkpoints", "get_checkpoint_archive_url", "session_id", "local"],
    TrainingClient: ["forward_backward", "forward", "forward_backward_custom", "optim_step", "save_state",
                     "save_weights_for_sampler", "save_weights_and_get_sampling_client", "load_state",
                     "load_state_with_optimizer", "list_checkpoints", "get_checkpoint_archive_url",
                     "create_sampling_client", "get_tokenizer", "get_info", "run_id", "policy_version",
                     "init_trainer_server", "health", "close", "aclose"],
    SamplingClient: ["sample", "compute_logprobs", "discover_base_model_name", "discover_adapter_name",
                     "get_base_model", "get_tokenizer", "ensure_ready", "ensure_ready_for_deployment"],
}
# Blocking helpers the seed says have no *_async twin.
NO_TWIN = {"health", "get_tokenizer", "get_info", "close", "aclose", "ensure_ready_for_deployment",
           "discover_base_model_name", "discover_adapter_name", "get_base_model", "local", "session_id", "run_id",
           "policy_version", "backend_name"}
# Exercised outside the parametrized suite (they need a server of their own): tests/test_local_binding.py
ELSEWHERE = {"ServiceClient.local"}


def test_seed_surface_exists():
    missing = [f"{cls.__name__}.{name}" for cls, names in SEED_SURFACE.items() for name in names
               if not hasattr(cls, name)]
    assert not missing


@pytest.mark.parametrize("cls", [ServiceClient, TrainingClient, SamplingClient], ids=lambda c: c.__name__)
def test_every_call_has_an_async_twin_with_the_same_parameters(cls):
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_") or name.endswith("_async") or name in NO_TWIN:
            continue
        twin = getattr(cls, f"{name}_async", None)
        assert twin is not None, f"{cls.__name__}.{name} has no {name}_async"
        assert inspect.iscoroutinefunction(twin), f"{cls.__name__}.{name}_async is not awaitable"
        # names, kinds, defaults and annotations all equal; and the same documentation
        assert inspect.signature(fn) == inspect.signature(twin), name
        assert fn.__doc__ == twin.__doc__ and fn.__doc__, name


def _called_names() -> set[str]:
    names: set[str] = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    for fixture_src in (Path(__file__).parent.parent / "plugin.py",):
        for node in ast.walk(ast.parse(fixture_src.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
    return names


def test_every_public_method_is_exercised_by_the_suite():
    called = _called_names()
    public = {f"{cls.__name__}.{n}" for cls in (ServiceClient, TrainingClient, SamplingClient)
              for n, _ in inspect.getmembers(cls) if not n.startswith("_")}
    exercised = {p for p in public if p.split(".")[1] in called} | ELSEWHERE
    assert public - exercised == set(), f"not exercised by the contract suite: {sorted(public - exercised)}"
