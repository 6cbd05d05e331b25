"""loops: an open, pluggable implementation of the Loops training SDK.

``ServiceClient`` provisions, ``TrainingClient`` trains, ``SamplingClient`` samples from exactly the
weights just trained. The backend is chosen by ``LOOPS_BACKEND`` (fake, local, modal, baseten).
Importing this package never imports torch, transformers, peft, vllm or modal.
"""

from ._version import __version__  # noqa: E402

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors
from .futures import APIFuture, ForwardBackwardFuture  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .sampling_client import SamplingClient  # noqa: E402
from .service_client import ServiceClient  # noqa: E402
from .training_client import TrainingClient  # noqa: E402
from .types import *  # noqa: E402,F401,F403
from .types import __all__ as _types

__all__ = sorted(["APIFuture", "ForwardBackwardFuture", "SamplingClient", "ServiceClient", "TrainingClient",
                  "hookimpl", "__version__", *_errors, *_types])
