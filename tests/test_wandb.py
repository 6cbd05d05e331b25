"""W&B logging with the real wandb package in offline mode (no account, no network): one W&B step
per training step, the forward_backward metrics and the optimizer's together."""

from __future__ import annotations

import pytest

from loops_core import AdamParams, ServiceClient, WandbConfig
from loops_core.testing.contract.data import france, sft_datum

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")


def test_one_wandb_step_per_training_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    service = ServiceClient(backend="fake")
    tc = service.create_lora_training_client("loops/fake-wandb", rank=4,
                                             wandb_config=WandbConfig(project="loops-test", name="steps"))
    run = tc._wandb
    datum = sft_datum(*france(tc.get_tokenizer()))
    for _ in range(3):
        tc.forward_backward([datum]).result(timeout=60)
        tc.forward_backward([datum]).result(timeout=60)  # gradient accumulation: still the same step
        tc.optim_step(AdamParams(learning_rate=1e-2)).result(timeout=60)
    assert run.step == 3
    logged = set(run.summary.keys())
    assert "train/loss:sum" in logged and any(k.startswith("optim/") for k in logged), logged
    tc.close()
    service.close()
