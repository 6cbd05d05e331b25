"""The contract suite on the baseten backend, against the control-plane emulator (fake engine).

``BasetenBackend.contract_environment()`` starts the emulator on a free loopback port and points
``LOOPS_BASE_URL`` / ``BASETEN_API_KEY`` at it, so the suite's ``ServiceClient(backend="baseten")``
goes through the real control-plane client, gateway headers, readiness and heartbeat code.

The suite's plugin parametrizes ``backend_name`` from ``--loops-backends`` / ``LOOPS_TEST_BACKENDS``
(default ``fake``). This module pins it to ``baseten`` whatever those say: a test module's own
``pytest_generate_tests`` runs before the plugin's, so it parametrizes first and then makes the
plugin's parametrization of the same name a no-op for these tests only.
"""

import pytest

from loops_core.testing.contract.test_bad_input import *  # noqa: F401,F403
from loops_core.testing.contract.test_checkpoints import *  # noqa: F401,F403
from loops_core.testing.contract.test_sampling import *  # noqa: F401,F403
from loops_core.testing.contract.test_surface import *  # noqa: F401,F403
from loops_core.testing.contract.test_training import *  # noqa: F401,F403


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" not in metafunc.fixturenames:
        return
    metafunc.parametrize("backend_name", [pytest.param("baseten", marks=pytest.mark.baseten)], scope="session")
    parametrize = metafunc.parametrize

    def without_backend_name(argnames, *args, **kwargs):  # noqa: ANN001, ANN202
        if argnames == "backend_name":
            return None  # already pinned to baseten above
        return parametrize(argnames, *args, **kwargs)

    metafunc.parametrize = without_backend_name  # type: ignore[method-assign]
