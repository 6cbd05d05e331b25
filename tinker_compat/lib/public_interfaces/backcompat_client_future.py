"""Futures of clients that can still be used as the client (deprecated, as in tinker 0.38).

``ServiceClient.create_lora_training_client(...)`` returns a future of the ``TrainingClient``:
``.result()`` or ``await`` it. Code written for older SDKs that calls client methods on the return
value directly still works: each such call (and each attribute read) warns with FutureWarning,
waits for the client and forwards. The futures are also instances of the client class, as in
Tinker, so ``isinstance`` checks keep passing.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, TypeVar

from .api_future import APIFuture, AwaitableConcurrentFuture  # noqa: F401 (Tinker's import path)

C = TypeVar("C")


class BackcompatClientFuture(APIFuture[C]):
    _client_name = "client"

    def _awaited_client(self) -> C:
        return self.result()

    def _warn(self) -> None:
        warnings.warn(f"Using the future as the {self._client_name} is deprecated; call .result() on it, or await "
                      f"it, to get the {self._client_name} first", FutureWarning, stacklevel=3)

    def __getattr__(self, name: str) -> Any:
        # Instance attributes of the client (e.g. ``model_id``): the forwarders cannot list them.
        if name.startswith("_"):
            raise AttributeError(name)
        self._warn()
        return getattr(self._awaited_client(), name)


def add_forwarders(future_cls: type, client_cls: type) -> type:
    """Give ``future_cls`` one deprecated forwarder per public method and property of ``client_cls``."""
    future_cls._client_name = client_cls.__name__
    for name, attr in vars(client_cls).items():
        if name.startswith("_") or isinstance(attr, (staticmethod, classmethod)):
            continue
        if isinstance(attr, property):
            setattr(future_cls, name, property(_forward_property(name)))
        elif inspect.isfunction(attr):
            setattr(future_cls, name, _forward_method(name, attr))
    return future_cls


def _forward_method(name: str, fn: Any) -> Any:
    # (self, *args, **kwargs), as in Tinker: the client's own method checks the arguments.
    def method(self: BackcompatClientFuture, *args: Any, **kwargs: Any) -> Any:
        self._warn()
        return getattr(self._awaited_client(), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Deprecated: ``.result().{name}(...)``."
    return method


def _forward_property(name: str) -> Any:
    def getter(self: BackcompatClientFuture) -> Any:
        self._warn()
        return getattr(self._awaited_client(), name)

    return getter
