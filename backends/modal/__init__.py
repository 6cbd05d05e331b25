"""The ``modal`` backend: loops' trainer and sampler servers in Modal GPU containers.

Modules, each importable on its own:

* ``settings``  options and env vars, read when a ServiceClient is built; the Modal token check;
* ``container`` what runs in a container: config from env, the servers;
* ``volume``    the checkpoint Volume in a container: store, reloads off the event loop, the
  journal a restarted sampler reloads its versions from;
* ``app``       the Modal app: images, Volume, the ``LoopsTrainer`` / ``LoopsSampler`` classes
  (imports ``modal`` at import time, as do the two fakes below);
* ``platform``  the provisioning seam and ``ModalPlatform``, its implementation with the modal client;
* ``backend``   ``ModalBackend``;
* ``fake_control_plane`` / ``fake_containers``  ``FakeModal``, a STAND-IN for Modal's servers
  (gRPC control plane, web endpoints, Volumes) on loopback, which the unmodified modal client
  talks to in tests; ``python -m loops_backends.modal.fake_control_plane`` runs one for scripts.

Nothing here is imported by ``import loops_core``; names below load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FakeModal", "ModalBackend"]


def __getattr__(name: str) -> Any:
    if name == "ModalBackend":
        from .backend import ModalBackend

        return ModalBackend
    if name == "FakeModal":
        from .fake_control_plane import FakeModal

        return FakeModal
    raise AttributeError(name)
