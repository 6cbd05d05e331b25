"""Describe the public surface of a ``tinker`` package as JSON, and diff two descriptions.

The same ``describe()`` runs against the real SDK (``tinker==0.38.0`` in a side venv: it cannot
share an environment with the shim, both are ``import tinker``) and against loops' shim; the
description of the real SDK is committed (``tests/data/tinker_surface_<version>.json``) so
``tests/test_tinker_surface.py`` compares offline. What is described, per public name of the
modules in ``MODULES``:

* kind: ``dataclass`` / ``pydantic`` / ``enum`` / ``exception`` / ``typeddict`` / ``class`` /
  ``function`` / ``alias`` (a typing construct such as a ``Literal`` or a ``Union``) / ``module``;
* dataclasses and pydantic models: frozen-ness, (pydantic) ``extra``, every public field with its
  type, required-ness and default, and every public method or property with its signature;
* enums: base (``StrEnum``...) and members; exceptions: bases and constructor signature;
* for each public submodule: the names it shares with its package (the import paths code uses; the
  shim's may hold more).

Method signatures are parameter names, kinds and defaults (annotations are left out: the two
packages spell the same return types through different futures). Types are rendered
canonically (``Optional[List[int]]`` and ``list[int] | None`` are both ``Union[None, list[int]]``).

    python scripts/tinker_surface_dump.py --real        # side venv with tinker==VERSION; writes the JSON
    python scripts/tinker_surface_dump.py --shim        # this environment's tinker, as JSON on stdout
    python scripts/tinker_surface_dump.py --diff        # shim vs the committed JSON, one line a difference
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import json
import subprocess
import sys
import types as pytypes
import typing
import warnings
from pathlib import Path
from typing import Any

VERSION = "0.38.0"
ROOT = Path(__file__).resolve().parent.parent
REAL_JSON = ROOT / "tests" / "data" / f"tinker_surface_{VERSION}.json"
# Packages whose public names are described, and whose public submodules are listed by import path.
MODULES = ["tinker", "tinker.types", "tinker.lib.public_interfaces"]


# ---- rendering ---------------------------------------------------------------------------------
def render_type(tp: Any) -> str:
    """A canonical spelling of an annotation (unions sorted, ``List`` as ``list``, classes by name)."""
    if tp is None or tp is type(None):
        return "None"
    if isinstance(tp, str):
        return tp
    if isinstance(tp, typing.ForwardRef):
        return tp.__forward_arg__
    if type(tp).__name__ == "TypeAliasType":
        return render_type(tp.__value__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return render_type(args[0])
    if origin is typing.Union or origin is pytypes.UnionType:
        return "Union[" + ", ".join(sorted(set(_union_members(tp)))) + "]"
    if origin is typing.Literal:
        return "Literal[" + ", ".join(sorted(repr(a) for a in args)) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        rendered = [("[" + ", ".join(render_type(x) for x in a) + "]") if isinstance(a, list) else render_type(a)
                    for a in args]
        return f"{name}[{', '.join(rendered)}]" if rendered else name
    if isinstance(tp, (type, typing.TypeVar)):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _union_members(tp: Any) -> list[str]:
    """The rendered members of a union, nested unions (aliases, ``Annotated``) flattened."""
    while type(tp).__name__ == "TypeAliasType" or typing.get_origin(tp) is typing.Annotated:
        tp = tp.__value__ if type(tp).__name__ == "TypeAliasType" else typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Union or typing.get_origin(tp) is pytypes.UnionType:
        return [m for a in typing.get_args(tp) for m in _union_members(a)]
    return [render_type(tp)]


def render_value(value: Any) -> str:
    text = repr(value)
    return f"<{type(value).__name__}>" if " at 0x" in text else text


def render_signature(fn: Any) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    parts, star_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            star_done = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = p.name + ("" if p.default is p.empty else "=" + render_value(p.default))
        parts.append(text + ("/" if p.kind is p.POSITIONAL_ONLY else ""))
    return "(" + ", ".join(parts) + ")"


# ---- description -------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls`` and its bases; one that cannot be resolved keeps its string.

    Each is evaluated in the namespace of a module that holds the class (Tinker rewrites
    ``__module__`` to ``"tinker"``, so that alone does not find the defining module) or of the
    globals of one of its functions.
    """
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        with warnings.catch_warnings():  # getattr on every loaded module wakes deprecation warnings
            warnings.simplefilter("ignore")
            namespaces = [vars(m) for m in list(sys.modules.values())
                          if m is not None and getattr(m, klass.__name__, None) is klass]
        namespaces += [f.__globals__ for f in vars(klass).values() if inspect.isfunction(f)]
        for name, ann in vars(klass).get("__annotations__", {}).items():
            hints[name] = ann
            if not isinstance(ann, str):
                continue
            for ns in namespaces:
                try:
                    hints[name] = eval(ann, dict(ns))  # noqa: S307 - annotations of installed code
                    break
                except Exception:  # noqa: BLE001 - try the next namespace
                    continue
    return hints


def _members(cls: type, skip: set[str]) -> dict[str, str]:
    """Public methods and properties of ``cls`` (beyond ``skip``): ``{name: "kind(signature)"}``."""
    out = {}
    for name in dir(cls):
        if name.startswith("_") or name in skip:
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property) or type(raw).__name__ in ("cached_property", "pydantic_property"):
            out[name] = "property"
        elif isinstance(raw, classmethod):
            out[name] = "classmethod" + (render_signature(raw.__func__) or "")
        elif isinstance(raw, staticmethod):
            out[name] = "staticmethod" + (render_signature(raw.__func__) or "")
        elif inspect.isfunction(raw):
            kind = "async" if inspect.iscoroutinefunction(raw) else "method"
            out[name] = kind + (render_signature(raw) or "")
        else:
            out[name] = "attribute"
    return out


def _pydantic_base() -> type | None:
    try:
        import pydantic
    except ImportError:
        return None
    return pydantic.BaseModel


def describe_object(obj: Any) -> dict[str, Any]:
    base_model = _pydantic_base()
    if inspect.ismodule(obj):
        return {"kind": "module"}
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return {"kind": "exception", "bases": [b.__name__ for b in obj.__bases__],
                    "init": render_signature(obj.__init__)}
        if issubclass(obj, enum.Enum):
            base = next((b.__name__ for b in (enum.StrEnum, enum.IntEnum) if issubclass(obj, b)), "Enum")
            return {"kind": "enum", "base": base, "members": {m.name: render_value(m.value) for m in obj}}
        if base_model is not None and issubclass(obj, base_model):
            fields = {}
            for name, info in obj.model_fields.items():
                required = info.is_required()
                default = None if required else (
                    render_value(info.default_factory()) if info.default_factory else render_value(info.default))
                fields[name] = {"type": render_type(info.annotation), "required": required,
                                "default": default}
            return {"kind": "pydantic", "frozen": bool(obj.model_config.get("frozen")),
                    "extra": obj.model_config.get("extra") or "ignore", "fields": fields,
                    "members": _members(obj, set(dir(base_model)) | set(fields))}
        if dataclasses.is_dataclass(obj):
            hints = _hints(obj)
            fields = {}
            for f in dataclasses.fields(obj):
                if f.name.startswith("_"):
                    continue
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                default = (render_value(f.default) if f.default is not dataclasses.MISSING else
                           render_value(f.default_factory()) if has_default else None)
                fields[f.name] = {"type": render_type(hints.get(f.name, f.type)), "required": not has_default,
                                  "default": default}
            return {"kind": "dataclass", "frozen": obj.__dataclass_params__.frozen, "fields": fields,
                    "init": render_signature(obj.__init__), "members": _members(obj, set(fields))}
        if typing.is_typeddict(obj):
            return {"kind": "typeddict", "fields": {k: render_type(v) for k, v in _hints(obj).items()}}
        return {"kind": "class", "init": render_signature(obj.__init__) if "__init__" in vars(obj) else None,
                "members": _members(obj, set())}
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return {"kind": "function", "signature": render_signature(obj)}
    return {"kind": "alias", "type": render_type(obj)}


def _public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and not inspect.ismodule(v) and not isinstance(v, type(annotations))]
    return sorted(set(names))


def describe() -> dict[str, Any]:
    """The surface of the ``tinker`` importable here."""
    out: dict[str, Any] = {"modules": {}, "submodules": {}}
    for modname in MODULES:
        module = importlib.import_module(modname)
        out["modules"][modname] = {name: describe_object(getattr(module, name)) for name in _public_names(module)}
        for name, sub in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.ismodule(sub) or not sub.__name__.startswith(modname + "."):
                continue
            shared = sorted(n for n in dir(sub) if not n.startswith("_") and n in vars(module)
                            and getattr(module, n) is getattr(sub, n) and not inspect.ismodule(getattr(sub, n))
                            and not isinstance(getattr(sub, n), type(annotations)))
            out["submodules"][sub.__name__] = shared
    return out


# ---- comparison --------------------------------------------------------------------------------
def diff(real: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """One line per difference, ``<dotted path>: <what differs>`` (stable, for an allowlist)."""
    lines: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in b:
                    lines.append(f"{path}.{key}: missing")
                elif key not in a:
                    lines.append(f"{path}.{key}: extra")
                else:
                    walk(f"{path}.{key}", a[key], b[key])
        elif a != b:
            lines.append(f"{path}: {json.dumps(a)} != {json.dumps(b)}")

    for modname in sorted(set(real["modules"]) | set(ours["modules"])):
        real_mod, our_mod = real["modules"].get(modname, {}), ours["modules"].get(modname, {})
        for name in sorted(set(real_mod) | set(our_mod)):
            path = f"{modname}.{name}"
            if name not in our_mod:
                lines.append(f"{path}: missing")
            elif name not in real_mod:
                lines.append(f"{path}: extra")
            elif real_mod[name].get("kind") != our_mod[name].get("kind"):
                lines.append(f"{path}: kind {real_mod[name].get('kind')} != {our_mod[name].get('kind')}")
            else:
                walk(path, real_mod[name], our_mod[name])
    for sub in sorted(set(real["submodules"]) | set(ours["submodules"])):
        if sub not in ours["submodules"]:
            lines.append(f"{sub}: missing module")
        elif sub not in real["submodules"]:
            lines.append(f"{sub}: extra module")
        else:  # a name the module lacks breaks ``from <module> import <name>``; one more breaks nothing
            for name in sorted(set(real["submodules"][sub]) - set(ours["submodules"][sub])):
                lines.append(f"{sub}.{name}: missing from module")
    return lines


def real_description() -> dict[str, Any]:
    """Describe ``tinker==VERSION`` from a side venv (built once, cached; see tests/sidevenv.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sidevenv import side_venv

    python = side_venv(f"tinker-{VERSION}", [f"tinker=={VERSION}"], python=(3, 11))
    done = subprocess.run([str(python), __file__, "--shim"], capture_output=True, text=True, timeout=600,
                          cwd="/", check=True)  # cwd outside the repo: the side venv's tinker, not ours
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--real", action="store_true", help=f"describe tinker=={VERSION}; write {REAL_JSON.name}")
    group.add_argument("--shim", action="store_true", help="describe the tinker importable here (stdout)")
    group.add_argument("--diff", action="store_true", help="the shim vs the committed description")
    args = parser.parse_args()
    if args.real:
        REAL_JSON.parent.mkdir(parents=True, exist_ok=True)
        REAL_JSON.write_text(json.dumps(real_description(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {REAL_JSON}")
    elif args.shim:
        print(json.dumps(describe(), indent=1, sort_keys=True))
    else:
        lines = diff(json.loads(REAL_JSON.read_text()), describe())
        print("\n".join(lines))
        print(f"{len(lines)} differences", file=sys.stderr)


if __name__ == "__main__":
    main()
