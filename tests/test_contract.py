"""The contract suite (shipped in loops_core.testing.contract), run here on the selected backends.

Default: ``fake``. ``LOOPS_TEST_BACKENDS=fake,local pytest tests/test_contract.py`` adds the
torch backend.
"""

from loops_core.testing.contract.test_bad_input import *  # noqa: F401,F403
from loops_core.testing.contract.test_checkpoints import *  # noqa: F401,F403
from loops_core.testing.contract.test_sampling import *  # noqa: F401,F403
from loops_core.testing.contract.test_surface import *  # noqa: F401,F403
from loops_core.testing.contract.test_training import *  # noqa: F401,F403
from loops_core.testing.contract.test_multirun import *  # noqa: F401,F403
