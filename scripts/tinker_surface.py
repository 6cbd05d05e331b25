"""How much of the real Tinker SDK's public surface the ``tinker`` shim covers.

Downloads ``tinker==0.38.0`` (the wheel only, no dependencies; it needs Python >= 3.11, so the
download asks for a 3.11 wheel whatever runs this script), unzips it, and introspects two
packages that are both named ``tinker``, each in its own subprocess: the real one (imported from
the unzipped wheel when its dependencies happen to be installed, else read with ``ast`` from the
source files) and the shim (imported). Prints, for every public method of the classes Tinker
exports, whether the shim has it and whether its signature is compatible, and the share of the
methods real code uses (the tinker-cookbook list below) that the shim covers::

    python scripts/tinker_surface.py            # the methods real code uses, and a per-class summary
    python scripts/tinker_surface.py --all      # every public method
    python scripts/tinker_surface.py --wheel-dir DIR   # reuse an unzipped wheel (offline)

Signature-compatible means: every Tinker parameter exists in the shim by name, positional ones at
the same position, keyword-only ones keyword-only; where Tinker has a default the shim has one;
the shim requires nothing Tinker does not pass; ``**kwargs`` is kept where Tinker has it; and an
``async def`` stays awaitable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.38.0"

# Methods tinker-cookbook 0.6.1 calls (notes: tinker-api.md §5.3 "what the cookbook needs", §1.6
# "the cookbook uses only", §5.5 the smallest clients, §3 TensorData / ModelInput helpers).
USED_BY_REAL_CODE: dict[str, list[str]] = {
    "ServiceClient": ["__init__", "create_lora_training_client", "create_training_client_from_state",
                      "create_training_client_from_state_with_optimizer", "create_sampling_client",
                      "create_rest_client", "get_server_capabilities"],
    "TrainingClient": ["forward", "forward_backward", "forward_backward_custom", "optim_step", "save_state",
                       "save_weights_for_sampler", "save_weights_and_get_sampling_client", "create_sampling_client",
                       "save_weights_external", "get_info", "get_tokenizer"],
    "SamplingClient": ["sample", "compute_logprobs", "get_tokenizer", "get_base_model"],
    "RestClient": ["get_training_run_by_tinker_path", "delete_checkpoint_from_tinker_path",
                   "get_external_weights_urls", "get_server_capabilities"],
    "APIFuture": ["result", "result_async"],
    "Datum": ["with_provenance"],
    "ModelInput": ["from_ints", "to_ints", "empty", "append", "append_int"],
    "TensorData": ["from_numpy", "from_torch", "from_torch_sparse", "to_numpy", "to_torch", "tolist"],
    "ParsedCheckpointTinkerPath": ["from_tinker_path"],
}

# Runs in a subprocess: ``python - <real|shim> [path]`` prints {class: {method: signature}}.
INTROSPECT = r'''
import ast, inspect, json, sys
from pathlib import Path

which, root = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
KINDS = {inspect.Parameter.POSITIONAL_ONLY: "pos", inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
         inspect.Parameter.VAR_POSITIONAL: "*args", inspect.Parameter.KEYWORD_ONLY: "kw",
         inspect.Parameter.VAR_KEYWORD: "**kwargs"}


def wanted(cls_name, name):
    return not name.startswith("_") or (name == "__init__" and cls_name.endswith("Client"))


def by_import(prefixes):
    import tinker
    out = {}
    for cls_name in tinker.__all__:
        cls = getattr(tinker, cls_name, None)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        methods = {}
        for klass in cls.__mro__:
            if not klass.__module__.startswith(prefixes):
                continue
            for name, attr in vars(klass).items():
                if name in methods or not wanted(cls_name, name):
                    continue
                skip_first = not isinstance(attr, staticmethod)
                fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                if not inspect.isfunction(fn):
                    continue
                params = list(inspect.signature(fn).parameters.values())[1 if skip_first else 0:]
                methods[name] = {"params": [[p.name, KINDS[p.kind], p.default is not p.empty] for p in params],
                                 "async": inspect.iscoroutinefunction(fn)}
        out[cls_name] = methods
    return out


def by_ast(root):
    """Read the package's source: follow tinker/__init__.py's imports to each exported class."""
    root = Path(root)

    def module_file(mod):
        p = root.joinpath(*mod.split("."))
        return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")

    trees = {}

    def tree(mod):
        if mod not in trees:
            f = module_file(mod)
            trees[mod] = ast.parse(f.read_text()) if f.is_file() else ast.Module(body=[], type_ignores=[])
        return trees[mod]

    def resolve(mod, name, depth=0):
        """(module, ClassDef) defining ``name`` as seen from ``mod``, following re-exports."""
        if depth > 10:
            return None
        for node in tree(mod).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return mod, node
        for node in tree(mod).body:
            if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
                alias = next(a for a in node.names if (a.asname or a.name) == name)
                base = mod if module_file(mod).name == "__init__.py" else mod.rsplit(".", 1)[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                if target and target.split(".")[0] == "tinker":
                    return resolve(target, alias.name, depth + 1)
        return None

    def methods_of(mod, cls, seen_classes, exported_name):
        found = {}
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and wanted(exported_name, node.name):
                decos = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
                if decos & {"property", "cached_property", "functools.cached_property"} or \
                        any(d.endswith(".setter") for d in decos):
                    continue
                a = node.args
                pos = [[x.arg, "pos", False] for x in a.posonlyargs + a.args]
                for i in range(1, len(a.defaults) + 1):
                    pos[-i][2] = True
                params = pos + ([[a.vararg.arg, "*args", False]] if a.vararg else [])
                params += [[x.arg, "kw", d is not None] for x, d in zip(a.kwonlyargs, a.kw_defaults)]
                params += [[a.kwarg.arg, "**kwargs", False]] if a.kwarg else []
                if "staticmethod" not in decos:
                    params = params[1:]
                found[node.name] = {"params": params, "async": isinstance(node, ast.AsyncFunctionDef)}
        for b in cls.bases:  # inherited methods from classes of the package
            name = ast.unparse(b).split("[")[0].split(".")[-1]
            hit = resolve(mod, name)
            if hit and (hit[0], name) not in seen_classes:
                for k, v in methods_of(hit[0], hit[1], seen_classes | {(hit[0], name)}, exported_name).items():
                    found.setdefault(k, v)
        return found

    exported = []
    for node in tree("tinker").body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            exported = [e.value for e in node.value.elts]
    out = {}
    for name in exported:
        hit = resolve("tinker", name)
        if hit is None:
            continue
        mod, cls = hit
        bases = {ast.unparse(b) for b in cls.bases}
        if any(b.endswith(("Error", "Exception", "Warning")) for b in bases) or name.endswith(("Error", "Warning")):
            continue
        out[name] = methods_of(mod, cls, {(mod, name)}, name)
    return out


if which == "real":
    sys.path.insert(0, root)
    # The shim is installed under the same name: keep its (editable) finder out of the way.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    try:
        result, how = by_import(("tinker",)), "import"
        assert Path(sys.modules["tinker"].__file__).is_relative_to(root)
    except Exception as exc:
        result, how = by_ast(root), f"ast ({type(exc).__name__}: {str(exc)[:80]})"
else:
    result, how = by_import(("tinker", "loops_core")), "import"
print(json.dumps({"how": how, "classes": result}))
'''


def introspect(which: str, root: Path | None = None) -> dict:
    args = [sys.executable, "-", which] + ([str(root)] if root else [])
    proc = subprocess.run(args, input=INTROSPECT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"introspecting the {which} package failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def download(dest: Path) -> Path:
    """The unzipped tinker wheel (py3-none-any; Requires-Python >= 3.11)."""
    cmd = [sys.executable, "-m", "pip", "download", f"tinker=={VERSION}", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--disable-pip-version-check", "-q", "-d", str(dest)]
    subprocess.run(cmd, check=True, timeout=300)
    wheel = next(dest.glob("tinker-*.whl"))
    src = dest / "src"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(src)
    return src


def compatible(real: dict, shim: dict) -> bool:
    r_params, s_params = real["params"], shim["params"]
    if real["async"] and not shim["async"]:
        return False
    if [p[1] for p in r_params] == ["*args", "**kwargs"]:
        return True  # a pure pass-through (Tinker's backcompat forwarders): any shim signature forwards the same
    s_names = {p[0]: (i, p) for i, p in enumerate(s_params)}
    s_kinds = {p[1] for p in s_params}
    for i, (name, kind, has_default) in enumerate(r_params):
        if kind in ("*args", "**kwargs"):
            if kind not in s_kinds:
                return False
            continue
        if name not in s_names:
            if ("**kwargs" in s_kinds and kind == "kw") or ("*args" in s_kinds and "**kwargs" in s_kinds):
                continue
            return False
        j, (_, s_kind, s_default) = s_names[name]
        if s_kind != kind or (kind == "pos" and j != i) or (has_default and not s_default):
            return False
    r_names = {p[0] for p in r_params}
    return all(p[2] or p[0] in r_names or p[1] in ("*args", "**kwargs") for p in s_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="list every public method, not only the used ones")
    parser.add_argument("--wheel-dir", type=Path, help="an unzipped tinker wheel (skips the download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinker-surface-") as tmp:
        src = args.wheel_dir or download(Path(tmp))
        real = introspect("real", src)
    shim = introspect("shim")
    print(f"real tinker {VERSION} read by {real['how']}; shim read by {shim['how']}\n")

    rows = []
    for cls, methods in sorted(real["classes"].items()):
        for name, sig in sorted(methods.items()):
            ours = shim["classes"].get(cls, {}).get(name)
            used = name in USED_BY_REAL_CODE.get(cls, [])
            rows.append((cls, name, ours is not None, ours is not None and compatible(sig, ours), used))

    shown = rows if args.all else [r for r in rows if r[4]]
    width = max(len(f"{c}.{m}") for c, m, *_ in shown)
    print(f"{'class.method':<{width}}  present  compatible  used-by-real-code")
    for cls, name, present, ok, used in shown:
        print(f"{cls + '.' + name:<{width}}  {'yes' if present else 'NO':<7}  {'yes' if ok else 'NO':<10}  "
              f"{'yes' if used else ''}")
    missing = [f"{c}.{m}" for c, ms in USED_BY_REAL_CODE.items() for m in ms
               if not any(r[0] == c and r[1] == m for r in rows)]
    if missing:
        print(f"\n(listed as used but not found in the real package: {', '.join(missing)})")

    print(f"\n{'class':<30} {'methods':>7} {'present':>8} {'compatible':>11}")
    for cls in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == cls]
        print(f"{cls:<30} {len(mine):>7} {sum(r[2] for r in mine):>8} {sum(r[3] for r in mine):>11}")
    used_rows = [r for r in rows if r[4]]
    pct = 100.0 * sum(r[3] for r in used_rows) / max(len(used_rows), 1)
    print(f"\nall public methods: {sum(r[2] for r in rows)}/{len(rows)} present, "
          f"{sum(r[3] for r in rows)}/{len(rows)} signature-compatible")
    print(f"used by real code:  {sum(r[2] for r in used_rows)}/{len(used_rows)} present, "
          f"{sum(r[3] for r in used_rows)}/{len(used_rows)} signature-compatible = {pct:.1f}%")


if __name__ == "__main__":
    main()
