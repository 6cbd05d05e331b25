"""The local backend's provisioning: subprocess servers that never outlive their owner.

These use ``engine="fake"`` (the numpy engine in the same subprocess servers) so they test the
process handling in seconds; the contract suite covers the torch engine on ``local``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from loops_core import ServiceClient
    service = ServiceClient(backend="local", engine="fake")
    tc = service.create_lora_training_client("fake-model", rank=4)
    print(" ".join(str(p.proc.pid) for p in service.backend.processes), flush=True)
    how = sys.argv[1]
    if how == "crash":
        os.kill(os.getpid(), signal.SIGKILL)   # no atexit, no finally: only the children's watchdog helps
    elif how == "exception":
        raise RuntimeError("the user script fails")
    elif how == "close":
        service.close()
        print("closed", flush=True)
    # "exit": fall off the end without closing anything
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["crash", "exception", "exit", "close"])
def test_no_orphaned_servers(how, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    assert all(_alive(p) for p in pids)
    proc.wait(60)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = [p for p in pids if _alive(p)]
    for p in leftover:
        os.kill(p, signal.SIGKILL)
    assert not leftover, f"servers outlived a user script that ended by {how}"


def test_servers_answer_on_loopback_and_logs_are_kept():
    from loops_core import ServiceClient
    from loops_core.checkpoints import loops_home

    service = ServiceClient(backend="local", engine="fake")
    tc = service.create_lora_training_client("fake-model", rank=4)
    assert tc._endpoint.url.startswith("http://127.0.0.1:")
    assert tc.health() is None
    logs = list((loops_home() / "logs").glob(f"{tc.run_id}-*.log"))
    assert len(logs) == 2
    procs = [p.proc for p in service.backend.processes]  # close() empties the list: keep the handles
    assert len(procs) == 2
    service.close()
    assert all(proc.poll() is not None for proc in procs), "close() left a server process running"


def test_a_killed_server_process_is_reported_at_once_with_its_exit_code():
    from loops_core import ServerGoneError, ServiceClient
    from loops_core.testing.contract.data import france, sft_datum

    service = ServiceClient(backend="local", engine="fake")
    try:
        tc = service.create_lora_training_client("fake-model", rank=4)
        datum = sft_datum(*france(tc.get_tokenizer()))
        trainer = next(p for p in service.backend.processes if p.role == "trainer")
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait()
        started = time.monotonic()
        with pytest.raises(ServerGoneError, match="exited with code -9"):
            tc.forward_backward([datum]).result(timeout=60)
        assert time.monotonic() - started < 5
    finally:
        service.close()
