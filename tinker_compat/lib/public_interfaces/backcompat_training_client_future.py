"""``BackcompatTrainingClientFuture``: a future of a ``TrainingClient`` that still works as one."""

from __future__ import annotations

from .api_future import APIFuture  # noqa: F401 (Tinker's import path)
from .backcompat_client_future import BackcompatClientFuture, add_forwarders
from .backcompat_sampling_client_future import BackcompatSamplingClientFuture  # noqa: F401
from .sampling_client import SamplingClient  # noqa: F401
from .training_client import TrainingClient


class BackcompatTrainingClientFuture(BackcompatClientFuture[TrainingClient], TrainingClient):
    """What training-client factories return: ``.result()`` / ``await`` it for the ``TrainingClient``;
    calling ``TrainingClient`` methods on it directly works but is deprecated (FutureWarning)."""


add_forwarders(BackcompatTrainingClientFuture, TrainingClient)
