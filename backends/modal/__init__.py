"""The ``modal`` backend: loops' trainer and sampler servers in Modal GPU containers.

Modules, each importable on its own:

* ``settings``  options and env vars, read when a ServiceClient is built; the Modal token check;
* ``container`` what runs in a container: config from env, the servers, the Volume-aware store;
* ``app``       the Modal app: images, Volume, the ``LoopsTrainer`` / ``LoopsSampler`` classes
  (the only module that imports ``modal`` at import time);
* ``platform``  the provisioning seam and ``ModalPlatform``, its implementation on Modal;
* ``standin``   ``ModalStandIn``, the seam in this process, for tests without an account;
* ``backend``   ``ModalBackend``.

Nothing here is imported by ``import loops_core``; names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModalBackend", "ModalStandIn"]


def __getattr__(name: str) -> Any:
    if name == "ModalBackend":
        from .backend import ModalBackend

        return ModalBackend
    if name == "ModalStandIn":
        from .standin import ModalStandIn

        return ModalStandIn
    raise AttributeError(name)
