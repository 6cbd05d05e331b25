"""``BackcompatSamplingClientFuture``: a future of a ``SamplingClient`` that still works as one."""

from __future__ import annotations

from .api_future import APIFuture  # noqa: F401 (Tinker's import path)
from .backcompat_client_future import BackcompatClientFuture, add_forwarders
from .sampling_client import SamplingClient


class BackcompatSamplingClientFuture(BackcompatClientFuture[SamplingClient], SamplingClient):
    """What sampling-client factories return: ``.result()`` / ``await`` it for the ``SamplingClient``;
    calling ``SamplingClient`` methods on it directly works but is deprecated (FutureWarning)."""


add_forwarders(BackcompatSamplingClientFuture, SamplingClient)
