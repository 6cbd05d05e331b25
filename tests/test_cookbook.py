"""tinker-cookbook 0.6.1 recipes, unmodified, on loops through ``import tinker``.

Each recipe runs as ``python -m tinker_cookbook.recipes...`` at tiny sizes on the built-in
``loops/tiny-qwen3`` with ``renderer_name=role_colon``, and the test reads the recipe's own
``metrics.jsonl`` to check that training happened. Nothing is downloaded: the cookbook loads the
tokenizer with ``AutoTokenizer.from_pretrained("loops/tiny-qwen3")`` and the DPO recipe's data with
``datasets.load_dataset("Anthropic/hh-rlhf")``, so a temporary ``HF_HOME`` holds the tiny model
as that hub id and a small synthetic preference set (written here, in hh-rlhf's chosen/rejected
format) as that dataset, and ``HF_HUB_OFFLINE=1``.

The cookbook must be installed without its dependencies, so that it cannot pull the real
``tinker`` over the shim (see ``COOKBOOK_INSTALL``); without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COOKBOOK_INSTALL = ("pip install --no-deps tinker-cookbook==0.6.1 && pip install '.[cookbook]'")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tinker_cookbook") is None,
                       reason=f"tinker-cookbook is not installed (CI: {COOKBOOK_INSTALL})"),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("datasets") is None,
                       reason=f"the local backend needs torch; the recipes need datasets (CI: {COOKBOOK_INSTALL})"),
]
MODEL = "loops/tiny-qwen3"
REVISION = "0" * 40  # the hub cache needs some commit id for the snapshot


def _hub_model(hf_home: Path) -> None:
    """``loops/tiny-qwen3`` in the hub cache layout, its files linked from the generated model."""
    from loops_backends.local_gpu.tiny_model import tiny_model_path

    repo = hf_home / "hub" / "models--loops--tiny-qwen3"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for f in tiny_model_path().iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)


def _preference_dataset(hf_home: Path) -> None:
    """A synthetic ``Anthropic/hh-rlhf`` (the assistant says the number, not "no") in the datasets cache."""
    import datasets

    src = hf_home / "_preference_src"
    src.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        rows = [{"chosen": f"\n\nHuman: Say the number {i}.\n\nAssistant: {i}",
                 "rejected": f"\n\nHuman: Say the number {i}.\n\nAssistant: no"} for i in range(n)]
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = datasets.load_dataset("json", data_files={s: str(src / f"{s}.jsonl") for s in ("train", "test")},
                                  cache_dir=str(hf_home / "_build"))
    dest = hf_home / "datasets" / "Anthropic___hh-rlhf" / "default" / "0.0.0" / ("0" * 16)
    dest.mkdir(parents=True)
    for f in Path(built["train"].cache_files[0]["filename"]).parent.iterdir():
        shutil.copy(f, dest / f.name.replace("json-", "hh-rlhf-"))
    info = json.loads((dest / "dataset_info.json").read_text())
    info.update(builder_name="hh-rlhf", dataset_name="hh-rlhf", config_name="default")
    (dest / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(hf_home / "_build")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    _hub_model(home)
    _preference_dataset(home)
    return home


def run_recipe(module: str, backend: str, hf_home: Path, log_path: Path, *args: str) -> list[dict]:
    """Run ``python -m tinker_cookbook.<module> ...`` and return its metrics.jsonl rows."""
    env = {**os.environ, "LOOPS_BACKEND": backend, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", f"tinker_cookbook.{module}", f"model_name={MODEL}", "renderer_name=role_colon",
           f"log_path={log_path}", "behavior_if_log_dir_exists=delete", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=log_path.parent)
    tail = (proc.stderr or proc.stdout)[-3000:]
    assert proc.returncode == 0, tail
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


@pytest.mark.parametrize("backend", ["local", "fake"])
def test_chat_sl_on_the_bundled_conversations(backend, hf_home, tmp_path):
    import tinker_cookbook

    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    # The fake engine's bigram LoRA moves less per Adam step than the transformer, and a bigram
    # model's loss cannot fall as far: a larger rate, a smaller drop (8.08 -> 7.65, deterministic).
    lr, drop = {"local": ("1e-2", 1.0), "fake": ("2e-1", 0.2)}[backend]
    rows = run_recipe("recipes.chat_sl.train", backend, hf_home, tmp_path / "run", f"dataset={data}",
                      "batch_size=4", "max_length=1024", "max_steps=4", "lora_rank=4", f"learning_rate={lr}",
                      "save_every=0", "eval_every=0", "infrequent_eval_every=0")
    nll = series(rows, "train_mean_nll")
    assert len(nll) == 4 and nll[-1] < nll[0] - drop, nll  # the loss fell (10.3 -> 6.8 on local)
    assert "tinker://" in (tmp_path / "run" / "checkpoints.jsonl").read_text()


@pytest.mark.parametrize("backend", ["local", "fake"])
def test_math_rl_arithmetic(backend, hf_home, tmp_path):
    rows = run_recipe("recipes.math_rl.train", backend, hf_home, tmp_path / "run", "env=arithmetic",
                      "group_size=4", "groups_per_batch=4", "max_tokens=5", "max_steps=3", "lora_rank=4",
                      "learning_rate=1e-2", "eval_every=0", "save_every=0")
    entropy = series(rows, "optim/entropy")
    assert len(entropy) == 3 and len(series(rows, "env/all/reward/total")) == 3
    # The policy moved: the entropy of what it samples changed step to step (1.1 -> 7.2 on local) ...
    assert abs(entropy[-1] - entropy[0]) > 0.1, entropy
    # ... and the trainer scored the sampled tokens as the sampler did (the same weights on both).
    assert all(abs(kl) < 0.05 for kl in series(rows, "optim/kl_sample_train_v2")), rows


def test_dpo_on_a_synthetic_preference_set(hf_home, tmp_path):
    rows = run_recipe("recipes.preference.dpo.train", "local", hf_home, tmp_path / "run", "dataset=hhh",
                      "batch_size=4", "max_length=256", "max_steps=3", "learning_rate=1e-3")
    loss, accuracy = series(rows, "dpo_loss"), series(rows, "accuracy")
    assert loss[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert len(loss) == 3 and loss[-1] < loss[0] - 0.1 and accuracy[-1] > accuracy[0], rows
