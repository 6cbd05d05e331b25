"""Mirrors ``tinker.lib.public_interfaces``: the clients and futures, over loops' clients."""

from .admin_client import AdminClient
from .api_future import APIFuture, AwaitableConcurrentFuture
from .backcompat_sampling_client_future import BackcompatSamplingClientFuture
from .backcompat_training_client_future import BackcompatTrainingClientFuture
from .custom_loss import LossHandle, PerDatumLossFn
from . import rest_client_common  # noqa: F401 (Tinker's import path)
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient

__all__ = ["ServiceClient", "TrainingClient", "BackcompatTrainingClientFuture", "SamplingClient",
           "BackcompatSamplingClientFuture", "RestClient", "AdminClient", "APIFuture", "AwaitableConcurrentFuture",
           "LossHandle", "PerDatumLossFn"]
