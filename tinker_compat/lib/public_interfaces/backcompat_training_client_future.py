"""``BackcompatTrainingClientFuture``: a future of a ``TrainingClient`` that still works as one."""

from __future__ import annotations

from .backcompat_client_future import BackcompatClientFuture, add_forwarders
from .training_client import TrainingClient


class BackcompatTrainingClientFuture(BackcompatClientFuture[TrainingClient], TrainingClient):
    """What training-client factories return: ``.result()`` / ``await`` it for the ``TrainingClient``;
    calling ``TrainingClient`` methods on it directly works but is deprecated (FutureWarning)."""


add_forwarders(BackcompatTrainingClientFuture, TrainingClient)
