"""The published baseten-loops client drives loops' servers through its ``ServiceClient.local``.

baseten-loops needs Python >= 3.12 and heavy dependencies, so this runs only when
``LOOPS_PUBLISHED_CLIENT_PYTHON`` names an interpreter that has it installed, e.g.::

    python3.12 -m venv /tmp/bt && /tmp/bt/bin/pip install baseten-loops
    LOOPS_PUBLISHED_CLIENT_PYTHON=/tmp/bt/bin/python pytest tests/test_published_client.py
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON = os.environ.get("LOOPS_PUBLISHED_CLIENT_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="set LOOPS_PUBLISHED_CLIENT_PYTHON to a Python with baseten-loops")


def test_published_client_trains_and_samples_on_loops_servers():
    server = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--model", "fake-model", "--engine",
                               "fake", "--trainer-port", "0", "--sampler-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        urls = json.loads(server.stdout.readline())["urls"]
        script = Path(__file__).parent / "published" / "drive_loops_servers.py"
        r = subprocess.run([PYTHON, str(script), urls["trainer"], urls["sampler"]], capture_output=True, text=True,
                           timeout=300)
    finally:
        server.terminate()
        server.wait(10)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split(" ", 1)[0]: line for line in r.stdout.splitlines()}
    loss = float(lines["loss"].split()[1])
    assert loss < 0.1, lines["loss"]                       # 30 steps through forward_backward + optim_step
    assert lines["forward"] == "forward ok 1"
    assert "policy_version 0" in r.stdout
    sample = lines["sample"]
    assert "[None, -" in sample                            # prompt logprobs parsed from the completions shape
    assert ast.literal_eval(lines["logprobs"].split(" ", 1)[1])[0] is None
    assert lines["base"].startswith("base fake-model")
