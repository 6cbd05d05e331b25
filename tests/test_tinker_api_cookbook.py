"""tinker-cookbook 0.6.1's recipes, unmodified, on the REAL tinker 0.38.0 SDK against ``loops serve --api tinker``.

tests/test_cookbook.py runs the same recipes on loops' shim (``import tinker`` is loops); here the
cookbook and the published SDK live in a side venv (see tests/sidevenv.py) and reach a
``loops serve --api tinker`` subprocess (the helper of tests/test_tinker_api.py) through the
recipes' own ``base_url=`` option, with ``TINKER_API_KEY=tml-local``. Everything on the wire is the
SDK's own. As in test_cookbook.py, nothing is downloaded: a temporary ``HF_HOME`` holds the tiny
model under its hub id ``loops/tiny-qwen3`` (``HF_HUB_OFFLINE=1``), and each test reads the
recipe's ``metrics.jsonl`` to check that training happened.

The side venv: the SDK, a CPU torch (pinned: an unpinned torch would pull CUDA wheels) and what
the recipes import, then ``pip install --no-deps tinker-cookbook==0.6.1`` (the cookbook requires
``tml-renderers>=0.4.1``, which the recipes run here do not import and which is not on every
index). When it cannot be built, the tests skip and say why.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sidevenv import side_venv
from test_cookbook import MODEL, _hub_model, series
from test_tinker_api import Server

pytest.importorskip("google.protobuf")
pytest.importorskip("zstandard")

COOKBOOK = "tinker-cookbook==0.6.1"
# What the cookbook's recipes import, less tml-renderers (installed with --no-deps, see above);
# transformers as in loops' own environment.
PACKAGES = ["torch==2.13.0", "tinker==0.38.0", "transformers==5.24.0", "aiohttp", "anyio", "blobfile", "chz",
            "cloudpickle", "datasets", "huggingface-hub", "pillow", "pyrage", "rich", "termcolor", "tiktoken",
            "sympy", "pylatexenc", "math-verify"]
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def cookbook_python() -> Path:
    python = side_venv("tinker-cookbook-0.6.1", PACKAGES, python=(3, 11))
    check = [str(python), "-c", "import tinker, tinker_cookbook; assert tinker.__version__ == '0.38.0'"]
    venv = python.parent.parent
    with open(venv.parent / f"{venv.name}.cookbook.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(check, capture_output=True).returncode != 0:
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", COOKBOOK],
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.skip(f"could not install {COOKBOOK} in the side venv: {(done.stderr or done.stdout)[-500:]}")
            again = subprocess.run(check, capture_output=True, text=True)
            if again.returncode != 0:
                pytest.skip(f"{COOKBOOK} does not import in the side venv: {again.stderr[-500:]}")
    return python


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    if not HAS_TORCH:
        pytest.skip("loops/tiny-qwen3 (the recipes' tokenizer and the local engine) needs torch in loops' env")
    home = tmp_path_factory.mktemp("hf_home")
    _hub_model(home)
    return home


@pytest.fixture(params=["fake", "local"])
def server(request, tmp_path):
    if request.param == "local" and not HAS_TORCH:
        pytest.skip("--engine local needs torch")
    srv = Server(tmp_path, request.param)
    srv.engine = request.param
    yield srv
    srv.stop()


def run_recipe(python: Path, server: Server, module: str, hf_home: Path, log_path: Path, *args: str) -> list[dict]:
    """``python -m tinker_cookbook.<module> base_url=<server> ...`` in the side venv; its metrics.jsonl rows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "LOOPS_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(TINKER_API_KEY="tml-local", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [str(python), "-m", f"tinker_cookbook.{module}", f"base_url={server.url}", f"model_name={MODEL}",
           "renderer_name=role_colon", f"log_path={log_path}", "behavior_if_log_dir_exists=delete", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=log_path.parent)
    assert proc.returncode == 0, (f"{module} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}\n"
                                  f"server log:\n{server.log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    print(f"\n[{module} on --engine {server.engine}] {time.monotonic() - start:.1f}s")
    return rows


def test_chat_sl_on_the_bundled_conversations(hf_home, cookbook_python, server, tmp_path):
    data = subprocess.run([str(cookbook_python), "-c", "import tinker_cookbook, pathlib; print(pathlib.Path("
                           "tinker_cookbook.__file__).parent / 'example_data' / 'conversations.jsonl')"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # as in test_cookbook.py: the fake engine's bigram LoRA needs a larger rate and falls less
    lr, drop = {"local": ("1e-2", 1.0), "fake": ("2e-1", 0.2)}[server.engine]
    rows = run_recipe(cookbook_python, server, "recipes.chat_sl.train", hf_home, tmp_path / "run", f"dataset={data}",
                      "batch_size=4", "max_length=1024", "max_steps=4", "lora_rank=4", f"learning_rate={lr}",
                      "save_every=0", "eval_every=0", "infrequent_eval_every=0")
    nll = series(rows, "train_mean_nll")
    print(f"train_mean_nll: {nll}")
    assert len(nll) == 4 and nll[-1] < nll[0] - drop, nll  # 8.08 -> 7.65 on fake, 10.26 -> 6.70 on local
    assert "tinker://" in (tmp_path / "run" / "checkpoints.jsonl").read_text()


def test_math_rl_arithmetic(hf_home, cookbook_python, server, tmp_path):
    rows = run_recipe(cookbook_python, server, "recipes.math_rl.train", hf_home, tmp_path / "run", "env=arithmetic",
                      "group_size=4", "groups_per_batch=4", "max_tokens=5", "max_steps=3", "lora_rank=4",
                      "learning_rate=1e-2", "eval_every=0", "save_every=0")
    entropy = series(rows, "optim/entropy")
    print(f"optim/entropy: {entropy}; reward: {series(rows, 'env/all/reward/total')}")
    assert len(entropy) == 3 and len(series(rows, "env/all/reward/total")) == 3
    assert abs(entropy[-1] - entropy[0]) > 0.1, entropy  # the policy moved (7.12 -> 7.31 fake; 0.3-0.7 -> 0.9-4.5 local)
    # the trainer scored the sampled tokens as the sampler did (the same weights on both sides)
    assert all(abs(kl) < 0.05 for kl in series(rows, "optim/kl_sample_train_v2")), rows
