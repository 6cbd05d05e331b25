"""Real faults against a real server process (``loops serve --engine fake`` on loopback): a killed
server is an error within the unreachable budget, never a hang; a restarted one is
``ServerRestartedError``; a closed client fails at once. Timings are asserted loosely (bounds, not
benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from loops_core import (AdamParams, APIConnectionError, ClientClosedError, ModelInput, ServerRestartedError,
                        ServiceClient)
from loops_core.testing.contract.data import france, sft_datum

MODEL = "loops/fake-faults"


def start_server(trainer_port: int = 0, sampler_port: int = 0) -> tuple[subprocess.Popen, dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loops_core.cli", "serve", "--engine", "fake", "--model", MODEL,
         "--trainer-port", str(trainer_port), "--sampler-port", str(sampler_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            return proc, json.loads(line)["urls"]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("loops serve did not come up")


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def server():
    proc, urls = start_server()
    yield proc, urls
    kill(proc)


@pytest.fixture(autouse=True)
def short_budget(monkeypatch):
    monkeypatch.setenv("LOOPS_UNREACHABLE_TIMEOUT", "3")


def connect(urls: dict[str, str]) -> ServiceClient:
    return ServiceClient.local(trainer_url=urls["trainer"], sampler_url=urls["sampler"])


def test_killed_server_is_an_error_within_the_budget_not_a_hang(server):
    proc, urls = server
    service = connect(urls)
    tc = service.create_lora_training_client(MODEL, rank=4)
    prompt, answer = france(tc.get_tokenizer())
    datum = sft_datum(prompt * 100, answer)  # long enough that a queue of them is still running at the kill
    tc.forward_backward([datum]).result(timeout=60)
    pending = [tc.forward_backward([datum]) for _ in range(16)]
    kill(proc)
    started = time.monotonic()
    outcomes = []
    for future in pending:  # every future resolves, with its result or an error: none hangs
        try:
            outcomes.append(future.result(timeout=60))
        except APIConnectionError as exc:
            assert urls["trainer"] in str(exc)
            outcomes.append(exc)
    waited = time.monotonic() - started
    assert waited < 15, f"waited {waited:.1f} s on a dead server"
    assert isinstance(outcomes[-1], APIConnectionError), "the last operation cannot have been fetched"
    started = time.monotonic()
    with pytest.raises(APIConnectionError):
        tc.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=60)  # a new call
    assert time.monotonic() - started < 15


def test_restarted_server_is_a_restart_error_not_silent_progress(server):
    proc, urls = server
    service = connect(urls)
    tc = service.create_lora_training_client(MODEL, rank=4)
    datum = sft_datum(*france(tc.get_tokenizer()))
    tc.forward_backward([datum]).result(timeout=60)
    kill(proc)
    ports = [int(urls[k].rsplit(":", 1)[1]) for k in ("trainer", "sampler")]
    again, _ = start_server(*ports)
    try:
        with pytest.raises(ServerRestartedError, match="restarted"):
            tc.forward_backward([datum]).result(timeout=60)
    finally:
        kill(again)


def test_closed_clients_fail_at_once(server):
    _, urls = server
    service = connect(urls)
    tc = service.create_lora_training_client(MODEL, rank=4)
    sc = tc.save_weights_and_get_sampling_client("before-close").result(timeout=60)
    datum = sft_datum(*france(tc.get_tokenizer()))
    service.close()
    started = time.monotonic()
    with pytest.raises(ClientClosedError):
        tc.forward_backward([datum])
    with pytest.raises(ClientClosedError):
        service.create_lora_training_client(MODEL, rank=4)
    tc2 = connect(urls).create_lora_training_client(MODEL, rank=4)
    tc2.close()
    with pytest.raises(ClientClosedError):
        tc2.optim_step(AdamParams(learning_rate=1e-3))
    sc.close()
    with pytest.raises(ClientClosedError):
        sc.sample(ModelInput.from_ints([1, 2]), 1)
    assert time.monotonic() - started < 5


def test_nothing_listening_fails_fast():
    started = time.monotonic()
    with pytest.raises(APIConnectionError):
        ServiceClient.local(trainer_url="http://127.0.0.1:9", sampler_url="http://127.0.0.1:9") \
            .create_lora_training_client(MODEL, rank=4)
    assert time.monotonic() - started < 15
