"""The contract suite's pytest plugin (installed as a ``pytest11`` entry point).

Choose backends with ``--loops-backends fake,local`` or ``LOOPS_TEST_BACKENDS`` (default ``fake``);
a test module that sets ``LOOPS_CONTRACT_BACKENDS = ["name"]`` runs its tests on those instead.
A third-party backend runs the suite with::

    LOOPS_TEST_BACKENDS=mycloud pytest --pyargs loops_core.testing.contract

Fixtures: ``backend_name`` (parametrized, session scope), ``service`` (a ServiceClient),
``training_client`` (one trainer per backend, shared), ``tc`` (that trainer reset to a fresh
seeded adapter before each test), ``capabilities``. Marks: ``@pytest.mark.requires("cap")`` skips
where the backend does not declare ``cap``; a backend's ``known_gaps = {"test_name": "why"}``
turns those tests into strict xfails, so a gap that closes is noticed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

CONTRACT_RANK = 8
CONTRACT_SEED = 1234


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loops")
    group.addoption("--loops-backends", default=None,
                    help="comma-separated backends for the contract suite (default: LOOPS_TEST_BACKENDS or fake)")
    group.addoption("--loops-model", default=None, help="base model for the contract suite (default loops/tiny-qwen3)")


def _selected(config: pytest.Config) -> list[str]:
    raw = config.getoption("--loops-backends") or os.environ.get("LOOPS_TEST_BACKENDS") or "fake"
    return [n.strip() for n in raw.split(",") if n.strip()]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(capability): skip unless the backend declares the capability")
    for name in ("fake", "local", "modal", "baseten", "direct"):
        config.addinivalue_line("markers", f"{name}: contract test running on the {name} backend")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        # A test module may pin its backends (e.g. a module that runs the suite against an emulator).
        names = getattr(metafunc.module, "LOOPS_CONTRACT_BACKENDS", None) or _selected(metafunc.config)
        metafunc.parametrize("backend_name", [pytest.param(n, marks=getattr(pytest.mark, n)) for n in names],
                             scope="session")


def _backend_class(name: str) -> Any:
    from loops_core.plugins import load_backend

    return load_backend(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend_name" not in callspec.params:
            continue
        name = callspec.params["backend_name"]
        try:
            gaps = getattr(_backend_class(name), "known_gaps", {})
        except Exception:
            continue
        reason = gaps.get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.fixture(scope="session")
def contract_model(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--loops-model") or os.environ.get("LOOPS_TEST_MODEL") or "loops/tiny-qwen3"


@pytest.fixture(scope="session")
def service(backend_name: str) -> Iterator[Any]:
    """A ServiceClient on the backend, inside its ``contract_environment()`` when it has one (a
    backend that needs something running first, e.g. a control-plane emulator, provides it as a
    classmethod context manager)."""
    import contextlib

    from loops_core import ServiceClient

    env = getattr(_backend_class(backend_name), "contract_environment", None)
    with (env() if env else contextlib.nullcontext()):
        client = ServiceClient(backend=backend_name)
        yield client
        client.close()


@pytest.fixture(scope="session")
def capabilities(service: Any) -> frozenset[str]:
    return service.backend.capabilities


@pytest.fixture(scope="session")
def training_client(service: Any, contract_model: str) -> Iterator[Any]:
    tc = service.create_lora_training_client(contract_model, rank=CONTRACT_RANK, seed=CONTRACT_SEED)
    yield tc
    tc.close()


@pytest.fixture
def tc(training_client: Any) -> Any:
    """The shared trainer, reset to a fresh adapter (same seed) before each test."""
    training_client.init_trainer_server(CONTRACT_RANK, seed=CONTRACT_SEED).result(timeout=600)
    return training_client


@pytest.fixture(autouse=True)
def _requires(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("requires")
    if marker is None or "backend_name" not in request.fixturenames:
        return
    caps = request.getfixturevalue("capabilities")
    missing = [c for c in marker.args if c not in caps]
    if missing:
        pytest.skip(f"backend does not declare {', '.join(missing)}")
