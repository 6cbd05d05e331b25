"""The plugin contract: one hook. Backends are found through it, built-ins included.

A third-party package declares an entry point in the ``loops.backends`` group pointing at a
module with::

    from loops_core import hookimpl

    @hookimpl
    def register_backends(register):
        register("mycloud", "mycloud_loops.backend:MyCloudBackend", extra=None,
                 requires=("mycloud_sdk",), description="Trainers on MyCloud")
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("loops")
hookimpl = pluggy.HookimplMarker("loops")


@hookspec
def register_backends(register):  # type: ignore[no-untyped-def]
    """Register backends by calling ``register(name, target, *, extra=None, requires=(), description="")``.

    :param register: callback; ``target`` is a ``Backend`` subclass or a lazy ``"module:attr"``
        string, imported only when the backend is selected. ``extra`` names the pip extra that
        installs what the backend needs; ``requires`` lists the modules that must be importable.

    Called once when the plugin manager is built; not firstresult (every plugin registers). Hooks do
    no I/O.
    """
