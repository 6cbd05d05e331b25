"""Side virtual environments for tests that drive a real published client beside loops.

Some real clients cannot share loops' environment: ``tinker`` is the same import name as loops'
shim, ``baseten-loops`` needs Python >= 3.12, ``vllm`` brings its own CUDA torch. A test asks for
one with ``side_venv(name, packages, python=(3, 12))`` and gets the venv's interpreter, built once
and cached under ``LOOPS_SIDE_VENVS`` (default ``~/.cache/loops/side-venvs``), keyed by the
interpreter version and the package list. When no suitable interpreter exists, or pip cannot
install the packages, the test is skipped with a reason that says which.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _root() -> Path:
    return Path(os.environ.get("LOOPS_SIDE_VENVS") or Path.home() / ".cache" / "loops" / "side-venvs")


def _version_of(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_python(minimum: tuple[int, int]) -> str | None:
    """An interpreter of at least ``minimum``: this one, ``python3.X`` on PATH, or a pyenv version."""
    if sys.version_info[:2] >= minimum:
        return sys.executable
    candidates = [shutil.which(f"python{minimum[0]}.{m}") for m in range(minimum[1], minimum[1] + 4)]
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.*", "bin", "python3")))
    for python in filter(None, candidates):
        version = _version_of(python)
        if version is not None and version >= minimum:
            return python
    return None


def side_venv(name: str, packages: list[str], *, python: tuple[int, int] = (3, 11),
              pip_args: tuple[str, ...] = ()) -> Path:
    """The interpreter of a cached venv with ``packages`` installed (built on first use).

    Skips the calling test, with the reason, when it cannot be built.
    """
    interpreter = find_python(python)
    if interpreter is None:
        pytest.skip(f"{name}: needs a Python >= {python[0]}.{python[1]} (none on PATH or under pyenv)")
    version = _version_of(interpreter)
    key = hashlib.sha256(repr((version, sorted(packages), pip_args)).encode()).hexdigest()[:12]
    venv = _root() / f"{name}-{key}"
    exe = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (xdist workers, parallel sessions)
        if (venv / ".complete").exists():
            return exe
        shutil.rmtree(venv, ignore_errors=True)
        steps = [[interpreter, "-m", "venv", str(venv)],
                 [str(exe), "-m", "pip", "install", "-q", *pip_args, *packages]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                pytest.skip(f"{name}: could not build the side venv ({' '.join(step[:4])} ...): {' | '.join(tail)}")
        (venv / ".complete").touch()
    return exe
