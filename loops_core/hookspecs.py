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


@hookspec
def register_tokenizers(register):  # type: ignore[no-untyped-def]
    """Register tokenizer loaders by calling ``register(prefix, target)``.

    :param register: callback; a tokenizer id starting with ``prefix`` is loaded by ``target`` (a
        callable or a lazy ``"module:attr"`` string) called with the id. It returns a tokenizer, or a
        path that ``transformers.AutoTokenizer.from_pretrained`` loads. Ids no plugin claims go to
        ``AutoTokenizer`` as they are (a hub id or a local directory).
    """


@hookspec
def register_engines(register):  # type: ignore[no-untyped-def]
    """Register engine families by calling ``register(name, trainer, sampler, *, extra=None)``.

    :param register: callback; ``trainer`` and ``sampler`` are factories (callables or lazy
        ``"module:attr"`` strings) called with one ``loops_core.assembly.EngineConfig`` and returning
        a ``TrainerEngine`` / ``SamplerEngine``. ``loops serve --engine NAME`` and every backend that
        runs loops' servers build their engines through these.
    """
