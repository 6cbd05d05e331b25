"""How long a client waits on a trainer killed with SIGKILL: waiting in ``.result()`` and on a new call.

    python bench/dead_server.py

Two setups: ``ServiceClient.local`` bound to a ``loops serve --engine fake`` process (the client knows
only the URL: it gives up after ``LOOPS_UNREACHABLE_TIMEOUT``, 30 s by default), and the local backend
(``engine="fake"`` server subprocesses: the client sees the process exit and fails at once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from loops_core import APIConnectionError, AdamParams, ServiceClient
from loops_core.testing.contract.data import france, sft_datum

MODEL = "loops/fake-dead-server"


def _measure(service: ServiceClient, kill) -> tuple[float, float, str]:  # noqa: ANN001
    tc = service.create_lora_training_client(MODEL, rank=4)
    prompt, answer = france(tc.get_tokenizer())
    datum = sft_datum(prompt * 100, answer)
    pending = [tc.forward_backward([datum]) for _ in range(16)]
    kill(tc)
    started = time.monotonic()
    message = ""
    for future in pending:
        try:
            future.result(timeout=120)
        except APIConnectionError as exc:
            message = str(exc).splitlines()[0]
    waiting = time.monotonic() - started
    started = time.monotonic()
    try:
        tc.optim_step(AdamParams(learning_rate=1e-3)).result(timeout=120)
    except APIConnectionError:
        pass
    return waiting, time.monotonic() - started, message


def direct() -> tuple[float, float, str]:
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", "serve", "--engine", "fake", "--model", MODEL,
                             "--trainer-port", "0", "--sampler-port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls = next(json.loads(line)["urls"] for line in proc.stdout if line.startswith("{"))
    service = ServiceClient.local(trainer_url=urls["trainer"], sampler_url=urls["sampler"])
    try:
        return _measure(service, lambda tc: (os.kill(proc.pid, signal.SIGKILL), proc.wait()))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def local_backend() -> tuple[float, float, str]:
    service = ServiceClient(backend="local", engine="fake")

    def kill(tc) -> None:  # noqa: ANN001
        trainer = next(p for p in service.backend.processes if p.role == "trainer")
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait()

    try:
        return _measure(service, kill)
    finally:
        service.close()


if __name__ == "__main__":
    print(f"{'setup':<44}{'in .result()':>14}{'new call':>10}  error")
    for name, fn in (("ServiceClient.local -> loops serve (URL only)", direct),
                     ("local backend (server subprocess)", local_backend)):
        waiting, new_call, message = fn()
        print(f"{name:<44}{waiting:>12.1f} s{new_call:>8.1f} s  {message[:90]}")
