"""The contract suite on the baseten backend, against the control-plane emulator (fake engine).

``BasetenBackend.contract_environment()`` starts the emulator on a free loopback port and points
``LOOPS_BASE_URL`` / ``BASETEN_API_KEY`` at it, so the suite's ``ServiceClient(backend="baseten")``
goes through the real control-plane client, gateway headers, readiness and heartbeat code.

``LOOPS_CONTRACT_BACKENDS`` pins this module to ``baseten`` whatever ``--loops-backends`` /
``LOOPS_TEST_BACKENDS`` say.
"""


from loops_core.testing.contract.test_bad_input import *  # noqa: F401,F403
from loops_core.testing.contract.test_checkpoints import *  # noqa: F401,F403
from loops_core.testing.contract.test_sampling import *  # noqa: F401,F403
from loops_core.testing.contract.test_surface import *  # noqa: F401,F403
from loops_core.testing.contract.test_training import *  # noqa: F401,F403


LOOPS_CONTRACT_BACKENDS = ["baseten"]  # the contract plugin runs this module's imported tests on baseten alone
