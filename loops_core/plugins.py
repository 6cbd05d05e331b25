"""Finding backends: pluggy over the ``loops.backends`` entry-point group plus the built-ins.

Selection: an explicit ``backend=`` argument, else ``LOOPS_BACKEND``, else the embedded default
(``local``). Environment variables are read when a client is built, never at import.

``LOOPS_LOAD_PLUGINS`` (comma-separated entry-point names; empty means none) limits which
third-party plugins load. A plugin that fails to import is skipped with a warning, so one broken
package cannot take loops down; ``LOOPS_STRICT_PLUGINS=1`` re-raises instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from . import builtin_backends, hookspecs
from .errors import BackendNotFoundError, BackendUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Backend

ENTRY_POINT_GROUP = "loops.backends"


@dataclass
class BackendInfo:
    name: str
    target: Any  # a Backend subclass, or "module:attr"
    extra: str | None = None
    requires: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""
    missing: list[str] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        """Whether what the backend needs is importable (its extra is installed)."""
        self.missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return not self.missing

    def load(self) -> type["Backend"]:
        if not self.installed:
            raise BackendUnavailableError(self.name, self.extra, ModuleNotFoundError(
                f"missing module{'s' if len(self.missing) > 1 else ''}: {', '.join(self.missing)}"))
        try:
            return resolve_target(self.target)
        except ImportError as exc:
            raise BackendUnavailableError(self.name, self.extra, exc) from exc


def resolve_target(target: Any) -> Any:
    """A registered object: itself, or what a lazy ``"module:attr"`` string names (imported now)."""
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def registrations(hook: str, pm: pluggy.PluginManager | None = None) -> list[tuple[Any, ...]]:
    """What every plugin registered through ``hook`` (each ``register(*args)`` call, in plugin
    order); for the hooks whose registrations need no options (tokenizers, engine families)."""
    found: list[tuple[Any, ...]] = []
    for impl in getattr((pm or _default_pm()).hook, hook).get_hookimpls():
        impl.function(register=lambda *args: found.append(args))
    return found


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins and (optionally) third-party plugins."""
    pm = pluggy.PluginManager("loops")
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        _load_entrypoints(pm)
    pm.register(builtin_backends, name="loops-builtins")
    return pm


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    allowed = os.environ.get("LOOPS_LOAD_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if names is not None and ep.name not in names:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # one broken plugin must not break loops
            if os.environ.get("LOOPS_STRICT_PLUGINS") == "1":
                raise
            warnings.warn(f"loops: skipping plugin {ep.name!r} ({ep.value}): {exc}", RuntimeWarning, stacklevel=2)


def collect_backends(pm: pluggy.PluginManager | None = None) -> dict[str, BackendInfo]:
    """Every registered backend by name. On a name collision the first registration is kept and a
    warning names both plugins."""
    pm = pm or _default_pm()
    found: dict[str, BackendInfo] = {}

    for impl in pm.hook.register_backends.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or "?"

        def register(name: str, target: Any, *, extra: str | None = None, requires: tuple[str, ...] = (),
                     description: str = "", _plugin: str = plugin_name) -> None:
            if name in found:
                warnings.warn(f"loops: backend {name!r} from {_plugin} ignored; already registered by "
                              f"{found[name].plugin}", RuntimeWarning, stacklevel=2)
                return
            found[name] = BackendInfo(name, target, extra, tuple(requires), description, _plugin)

        impl.function(register=register)
    return found


@lru_cache(maxsize=1)
def _default_pm() -> pluggy.PluginManager:
    return get_plugin_manager()


def resolve_backend_name(explicit: str | None = None) -> str:
    """``explicit`` > ``LOOPS_BACKEND`` > the default, as the client settings read them."""
    from .settings import client_settings

    return client_settings(backend=explicit).backend


def load_backend(name: str | None = None, pm: pluggy.PluginManager | None = None) -> type["Backend"]:
    name = resolve_backend_name(name)
    backends = collect_backends(pm)
    if name not in backends:
        installed = sorted(n for n, info in backends.items() if info.installed)
        raise BackendNotFoundError(name, installed, {n: info.extra or n for n, info in backends.items()
                                                     if n not in installed})
    return backends[name].load()
