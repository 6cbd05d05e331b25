"""The published baseten-loops client, every public method, against loops' servers and emulator.

A side venv (``tests/sidevenv.py``: Python >= 3.12 from PATH or pyenv, ``baseten-loops==0.32.0``)
runs ``tests/published/drive_published_client.py`` against three targets:

* ``serve-fake``: ``loops serve --engine fake`` through ``ServiceClient.local``;
* ``serve-tiny``: ``loops serve --engine local --model loops/tiny-qwen3`` (torch), a subset;
* ``emulator``: ``loops emulate baseten`` through the full ``ServiceClient``.

Each check is one row of a method x target table, printed with ``-s`` (or on failure). A check
that cannot work is listed in ``XFAIL`` with its reason and is strict: it must fail, so a fix that
makes it pass has to remove it from the list. The last test proves that every public method of
``ServiceClient``, ``TrainingClient`` and ``SamplingClient`` has a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidevenv import side_venv

PACKAGES = ["baseten-loops==0.32.0"]
DRIVER = Path(__file__).parent / "published" / "drive_published_client.py"
FAKE_MODEL = "loops/tiny-qwen3"  # the fake engine plays it; the emulator supports it
EMULATOR_KEY = "published-client-emulator-key"

_LOCAL = "ServiceClient.local binds two URLs and nothing else"
_NO_CONTROL_PLANE = f"{_LOCAL}: no control plane (its base_url is ''), so no checkpoint registry"
_NO_RUN_ID = f"{_LOCAL}: its TrainingClient has no run_id, which the published client requires here"
_NO_FAULTS = "needs the emulator's fault controls and request records (loops serve has neither)"
_HUB = "loads the tokenizer from the Hugging Face hub by base model name; nothing is downloaded here"
_TORCH = "needs torch in the client's venv (baseten-loops[torch]); the side venv installs the client only"

_LOCAL_LIMITS = {
    "ServiceClient.__init__[team]": f"{_LOCAL}: no team argument",
    "ServiceClient.create_lora_training_client[unsupported base model]": f"{_LOCAL}: it provisions nothing",
    "ServiceClient.create_lora_training_client[scope=serverless]": f"{_LOCAL}: no scopes",
    "ServiceClient.create_sampling_client[scope=serverless]": f"{_LOCAL}: no scopes",
    "TrainingClient.save_weights_and_get_sampling_client[serverless]": f"{_LOCAL}: no scopes",
    "ServiceClient.get_server_capabilities": _NO_CONTROL_PLANE,
    "ServiceClient.get_server_capabilities_async": _NO_CONTROL_PLANE,
    "ServiceClient.list_checkpoints": _NO_RUN_ID,
    "ServiceClient.get_checkpoint_archive_url": _NO_RUN_ID,
    "ServiceClient.download_checkpoint": _NO_RUN_ID,
    "ServiceClient.create_sampling_client[model_path]": f"{_LOCAL}: 'Local ServiceClients do not support model_path'",
    "ServiceClient.create_training_client_from_state": _NO_RUN_ID,
    "ServiceClient.create_training_client_from_state_async": _NO_RUN_ID,
    "ServiceClient.create_training_client_from_state_with_optimizer": _NO_RUN_ID,
    "ServiceClient.create_training_client_from_state_with_optimizer_async": _NO_RUN_ID,
    "TrainingClient.save_state": _NO_RUN_ID,
    "TrainingClient.save_state_async": _NO_RUN_ID,
    "TrainingClient.save_weights_for_sampler": _NO_RUN_ID,
    "TrainingClient.save_weights_for_sampler_async": _NO_RUN_ID,
    "TrainingClient.save_weights_and_get_sampling_client": _NO_RUN_ID,
    "TrainingClient.save_weights_and_get_sampling_client_async": _NO_RUN_ID,
    "TrainingClient.save_weights_for_sampler[bump_version false keeps the sampler's version]": _NO_RUN_ID,
    "TrainingClient.create_sampling_client": f"{_LOCAL}: it validates the path with the control plane",
    "TrainingClient.load_state": _NO_RUN_ID,
    "TrainingClient.load_state_async": _NO_RUN_ID,
    "TrainingClient.load_state_with_optimizer": _NO_RUN_ID,
    "TrainingClient.load_state_with_optimizer_async": _NO_RUN_ID,
    "TrainingClient.load_state[missing path is a 400 at submit]": _NO_RUN_ID,
    "TrainingClient.list_checkpoints": _NO_RUN_ID,
    "TrainingClient.get_checkpoint_archive_url": _NO_CONTROL_PLANE,
    "TrainingClient.download_checkpoint": _NO_CONTROL_PLANE,
    "SamplingClient.sample[serverless: a timeout cancels the queued sample]": f"{_LOCAL}: no scopes",
    "SamplingClient.sample[serverless: 503 with Retry-After is waited out]": f"{_LOCAL}: no scopes",
    "SamplingClient.sample[dedicated: replica turnover 503/404 retried]": _NO_FAULTS,
    "SamplingClient.compute_logprobs[wire: max_tokens 1, prompt_logprobs 0, model only when serverless]": _NO_FAULTS,
    "ServiceClient.create_lora_training_client[paired sampler: created at first use, or eagerly unawaited]":
        _NO_FAULTS,
    "SamplingClient.discover_adapter_name": f"{_NO_RUN_ID} (its sampler comes from a save)",
    "SamplingClient.checkpoint_path": f"{_NO_RUN_ID} (its sampler comes from a save)",
    "SamplingClient.checkpoint_name": f"{_NO_RUN_ID} (its sampler comes from a save)",
}
_EVERYWHERE = {
    "TrainingClient.get_tokenizer": _HUB,
    "SamplingClient.get_tokenizer": _HUB,
    "TrainingClient.forward_backward_custom": _TORCH,
    "TrainingClient.forward_backward_custom_async": _TORCH,
}
XFAIL: dict[str, dict[str, str]] = {
    "serve-fake": {**_LOCAL_LIMITS, **_EVERYWHERE},
    "serve-tiny": {**_LOCAL_LIMITS, **_EVERYWHERE},
    "emulator": {**_EVERYWHERE},
}
_KEYED = ["ServiceClient.local[server with --api-key]", "TrainingClient.__init__[api_key, server with --api-key]",
          "SamplingClient.__init__[api_key, server with --api-key]"]
XFAIL["serve-fake+key"] = {_KEYED[0]: "the published ServiceClient.local takes no api_key (it sets none), so a "
                                      "keyed loops serve answers 401; its TrainingClient / SamplingClient take one"}
# serve-tiny runs torch on 2 CPU cores: the checks that matter for the engine, not every method again.
TINY_SUBSET = [
    "ServiceClient.local", "ServiceClient.create_lora_training_client", "TrainingClient.forward_backward",
    "TrainingClient.forward", "TrainingClient.forward[top_k_logprobs]", "TrainingClient.forward[chunked totals]",
    "TrainingClient.forward_backward[image datum refused at submit]", "TrainingClient.forward_backward[dppo]",
    "TrainingClient.forward_backward[cispo]", "TrainingClient.optim_step", "TrainingClient.policy_version",
    "ServiceClient.create_sampling_client", "SamplingClient.sample", "SamplingClient.compute_logprobs",
    "SamplingClient.discover_base_model_name",
]
RESULTS: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="module")
def published_python() -> Path:
    return side_venv("baseten-loops", PACKAGES, python=(3, 12))


def _spawn(args: list[str], ready: str, home: Path, timeout: float = 120.0,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start ``python -m loops_core.cli ARGS`` and read stdout up to the line starting ``ready``."""
    inherited = {k: v for k, v in os.environ.items() if k != "LOOPS_API_KEY"}  # keyed only when asked
    env = {**inherited, "LOOPS_HOME": str(home), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "loops_core.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith(ready):
            return proc, lines
    proc.kill()
    raise RuntimeError("the server did not start:\n" + "\n".join(lines[-20:]))


def _value(lines: list[str], prefix: str) -> str:
    return next(line.split(prefix, 1)[1].strip() for line in lines if line.startswith(prefix))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _drive(python: Path, config: dict, timeout: float) -> tuple[dict[str, dict], dict]:
    # Offline: the client's get_tokenizer would otherwise spend minutes retrying the Hugging Face hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([str(python), str(DRIVER), json.dumps(config)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    rows, summary = {}, {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "check" in item:
                rows[item["check"]] = item
            else:
                summary = item
    assert summary, f"the driver did not finish (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return rows, summary


def _classify(target: str, rows: dict[str, dict]) -> dict[str, str]:
    expected = XFAIL[target]
    out = {}
    for name, row in rows.items():
        if name in expected:
            out[name] = "XPASS (remove from XFAIL)" if row["ok"] else "xfail"
        else:
            out[name] = "pass" if row["ok"] else "FAIL"
    return out


def _report(target: str, rows: dict[str, dict]) -> None:
    verdicts = _classify(target, rows)
    RESULTS[target] = {n: {**rows[n], "verdict": verdicts[n]} for n in rows}
    width = max(map(len, rows))
    print(f"\n== published baseten-loops 0.32.0 -> {target}")
    for name, row in rows.items():
        print(f"{name:<{width}}  {verdicts[name]:<5}  {row['seconds']:>6.1f}s  {row['detail'][:110]}")
    counts = {v: list(verdicts.values()).count(v) for v in sorted(set(verdicts.values()))}
    print(f"== {target}: {counts}")
    bad = {n: (v, rows[n]["detail"]) for n, v in verdicts.items() if v not in ("pass", "xfail")}
    assert not bad, json.dumps(bad, indent=1)


def test_serve_fake(published_python, tmp_path):
    proc, lines = _spawn(["serve", "--model", FAKE_MODEL, "--engine", "fake", "--trainer-port", "0",
                          "--sampler-port", "0"], "sampler:", tmp_path / "home")
    try:
        rows, _ = _drive(published_python, {"mode": "local", "trainer_url": _value(lines, "trainer:"),
                                            "sampler_url": _value(lines, "sampler:"), "base_model": FAKE_MODEL,
                                            "tmp": str(tmp_path), "ready_timeout": 15}, timeout=900)
    finally:
        _stop(proc)
    _report("serve-fake", rows)


def test_serve_fake_with_api_key(published_python, tmp_path):
    key = "published-client-serve-key"
    env_key = {"LOOPS_API_KEY": key}  # from the environment: never on a command line
    proc, lines = _spawn(["serve", "--model", FAKE_MODEL, "--engine", "fake", "--trainer-port", "0",
                          "--sampler-port", "0"], "sampler:", tmp_path / "home", env=env_key)
    try:
        rows, _ = _drive(published_python, {"mode": "local", "trainer_url": _value(lines, "trainer:"),
                                            "sampler_url": _value(lines, "sampler:"), "base_model": FAKE_MODEL,
                                            "api_key": key, "tmp": str(tmp_path), "ready_timeout": 5,
                                            "subset": _KEYED}, timeout=300)
    finally:
        _stop(proc)
    _report("serve-fake+key", rows)


def test_serve_tiny_torch(published_python, tmp_path):
    pytest.importorskip("torch")
    proc, lines = _spawn(["serve", "--model", "loops/tiny-qwen3", "--engine", "local", "--sampler-engine", "hf",
                          "--trainer-port", "0", "--sampler-port", "0", "--rank", "4"], "sampler:",
                         tmp_path / "home", timeout=300)
    try:
        rows, _ = _drive(published_python, {"mode": "local", "trainer_url": _value(lines, "trainer:"),
                                            "sampler_url": _value(lines, "sampler:"),
                                            "base_model": "loops/tiny-qwen3", "tmp": str(tmp_path),
                                            "ready_timeout": 15, "subset": TINY_SUBSET}, timeout=900)
    finally:
        _stop(proc)
    _report("serve-tiny", rows)


def test_emulator(published_python, tmp_path):
    proc, lines = _spawn(["emulate", "baseten", "--port", "0", "--engine", "fake"],
                         "export BASETEN_API_KEY", tmp_path / "home", env={"LOOPS_EMULATOR_API_KEY": EMULATOR_KEY})
    try:
        rows, _ = _drive(published_python, {"mode": "service", "base_url": _value(lines, "export LOOPS_BASE_URL="),
                                            "api_key": EMULATOR_KEY, "base_model": FAKE_MODEL,
                                            "tmp": str(tmp_path), "ready_timeout": 15}, timeout=900)
    finally:
        _stop(proc)
    _report("emulator", rows)


def test_every_public_method_has_a_row(published_python, tmp_path):
    """Printed last: the method x target table. Every public method of the three published classes
    must appear in some check (``Class.method`` or ``Class.method[variant]``)."""
    if not RESULTS:
        pytest.skip("no target ran")
    _, summary = _drive(published_python, {"mode": "local", "trainer_url": "", "sampler_url": "", "base_model": "",
                                           "tmp": str(tmp_path), "subset": ["(none: list the methods)"]}, timeout=120)
    checks = {name for rows in RESULTS.values() for name in rows}
    missing = [m for m in summary["methods"] if not any(c == m or c.startswith(m + "[") for c in checks)]
    targets = list(RESULTS)
    names = sorted(set(summary["defined"]) | checks)
    width = max(map(len, names))
    print("\n== method x target (published baseten-loops 0.32.0)")
    print(f"{'check':<{width}}  " + "  ".join(f"{t:<10}" for t in targets))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{RESULTS[t].get(name, {}).get('verdict', '-'):<10}"
                                                for t in targets))
    assert not missing, f"public methods with no check: {missing}"
