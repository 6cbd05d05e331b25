"""Mirrors ``tinker.lib.public_interfaces``: the clients and futures, over loops' clients."""

from .api_future import APIFuture
from .backcompat_sampling_client_future import BackcompatSamplingClientFuture
from .backcompat_training_client_future import BackcompatTrainingClientFuture
from .rest_client import RestClient
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient

__all__ = ["APIFuture", "BackcompatSamplingClientFuture", "BackcompatTrainingClientFuture", "RestClient",
           "SamplingClient", "ServiceClient", "TrainingClient"]
