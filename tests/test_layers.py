"""Layers point one way: loops_core never imports a backend, and no two modules import each other
(directly or around a loop) at import time. Read from the source, so nothing needs to run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "loops_core"


def _module_name(path: Path) -> str:
    parts = ("loops_core", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (function bodies and TYPE_CHECKING blocks excluded)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if node.module:  # `from . import x` imports x, not the package's __init__ again
                    found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit([*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                       *[s for h in getattr(node, "handlers", []) for s in h.body]])

    visit(ast.parse(path.read_text()).body)
    return found


def _all_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_loops_core_imports_no_backend():
    offenders = {str(p.relative_to(ROOT.parent)): sorted(m for m in _all_imports(p) if m.startswith("loops_backends"))
                 for p in ROOT.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_in_loops_core():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: sorted(m for m in _top_level_imports(path) if m in modules and m != name)
             for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle; a submodule importing its
    # package's __init__ back is.
    graph = {n: [m for m in deps if not n.startswith(m + ".") or m == "loops_core"] for n, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                dfs(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])
    assert cycles == []
