"""The README's examples run as users would run them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, backend: str, *args: str, timeout: int = 300) -> str:
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "LOOPS_BACKEND": backend})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_seed_minimal_example_runs_verbatim_on_fake():
    out = run("examples/seed_minimal.py", "fake")
    tokens = ast.literal_eval(out.strip().splitlines()[-1])
    assert isinstance(tokens, list) and 1 <= len(tokens) <= 16


def test_quickstart_on_fake():
    out = run("examples/quickstart.py", "fake", "--steps", "30", "--lr", "5e-2")
    assert "' Paris'" in out, out


def test_quickstart_on_local_default_backend():
    pytest.importorskip("torch")
    out = run("examples/quickstart.py", "local")
    assert "backend: local" in out and "' Paris'" in out, out
    losses = [float(x.split(":")[1]) for x in out.split("loss: ")[1].splitlines()[0].split("  ")]
    assert losses[-1] < losses[0] / 100, losses
