"""The benchmark scripts run end to end at toy sizes and print their tables (speed is not judged
here: the scripts print ratios for a person to read; this only keeps them from rotting)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
RATIO = r"\d+\.\d\dx"


def run_bench(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_protocol_bench():
    out = run_bench("protocol.py", "--n", "8", "--inflight", "4")
    assert re.search(rf"sequential +ratio +{RATIO}", out), out
    assert re.search(rf"4 in flight +ratio +{RATIO}", out), out


@pytest.mark.slow
def test_train_throughput_bench():
    out = run_bench("train_throughput.py", "--batch", "2", "--seq", "16", "--steps", "1", "--rounds", "1",
                    "--warmup", "1", "--rank", "4")
    for row in ("bare HF \\+ peft", "loops, waited", "loops, pipelined"):
        assert re.search(rf"{row} +[\d,]+ +{RATIO}", out), out
    assert re.search(r"peak RSS of the training process: bare [\d,]+ MiB, loops [\d,]+ MiB, ratio \d+\.\d\dx", out), out


@pytest.mark.slow
def test_sample_throughput_bench():
    out = run_bench("sample_throughput.py", "--batches", "1,3", "--new", "3", "--prompt", "5", "--rounds", "1",
                    "--rank", "4")
    for batch in (1, 3):
        assert re.search(rf"^ +{batch} +[\d,.]+ +[\d,.]+ +{RATIO}$", out, re.M), out


@pytest.mark.slow
def test_multirun_bench():
    out = run_bench("multirun.py", "--engine", "fake", "--runs", "2", "--batch", "1", "--seq", "8", "--steps", "1",
                    "--rank", "4")
    assert re.search(r"2 runs on one server +1 +[\d,]+ +[\d,]+ MiB", out), out
    assert re.search(r"2 single-run servers +2 +[\d,]+ +[\d,]+ MiB", out), out
    assert re.search(rf"ratio shared / separate: tokens/s {RATIO}, memory {RATIO}", out), out
