"""Placement planning (``loops_backends.local_gpu.placement``) with made-up GPU memory figures.

Pure arithmetic, no GPU: shapes of Qwen3-0.6B to 8B on 24, 80 and 141 GB GPUs, one and two of them.
"""

from __future__ import annotations

import json

import pytest

from loops_backends.local_gpu.placement import (GiB, HEADROOM_ENV, Gpu, ModelShape, PlacementError,
                                                PlacementSettings, activation_bytes, plan_for_model,
                                                plan_placement, trainer_bytes)

QWEN3 = {  # layers, hidden, intermediate, heads, kv heads, head_dim, vocab, tied
    "0.6b": ModelShape(28, 1024, 3072, 16, 8, 128, 151936, True),
    "1.7b": ModelShape(28, 2048, 6144, 16, 8, 128, 151936, True),
    "4b": ModelShape(36, 2560, 9728, 32, 8, 128, 151936, True),
    "8b": ModelShape(36, 4096, 12288, 32, 8, 128, 151936, False),
}


def gpu(index=0, total_gb=80, used_gb=0.5):
    return Gpu(index, int(total_gb * GiB), int((total_gb - used_gb) * GiB))


@pytest.mark.parametrize("name,billions", [("0.6b", 0.6), ("1.7b", 1.7), ("4b", 4.0), ("8b", 8.2)])
def test_parameter_counts_match_the_published_sizes(name, billions):
    assert QWEN3[name].params / 1e9 == pytest.approx(billions, rel=0.06)


@pytest.mark.parametrize("name", list(QWEN3))
def test_one_80gb_gpu_shares_and_leaves_the_trainer_its_headroom(name):
    shape = QWEN3[name]
    plan = plan_placement(shape, [gpu()])
    assert plan.shared and plan.trainer_device == plan.sampler_device == "cuda:0"
    # The sampler's share is computed from what is free once the trainer is up.
    total = 80 * GiB
    free_after_trainer = total - plan.trainer_resident
    frac = plan.sampler_memory_fraction(free_after_trainer, total)
    sampler_takes = frac * total
    assert sampler_takes >= plan.sampler_min
    # What is left after the sampler's reservation covers the trainer's activations.
    assert free_after_trainer - sampler_takes >= plan.activation_headroom
    assert 0.0 < frac < 0.92


def test_trainer_already_using_memory_shrinks_the_sampler_share():
    plan = plan_placement(QWEN3["1.7b"], [gpu()])
    total = 80 * GiB
    light = plan.sampler_memory_fraction(70 * GiB, total)
    heavy = plan.sampler_memory_fraction(50 * GiB, total)
    assert heavy == pytest.approx(light - 20 / 80, abs=1e-3)


def test_larger_micro_batch_means_more_headroom_and_a_smaller_sampler_share():
    small = plan_placement(QWEN3["4b"], [gpu()], PlacementSettings(micro_batch_tokens=2048))
    large = plan_placement(QWEN3["4b"], [gpu()], PlacementSettings(micro_batch_tokens=32768))
    assert large.activation_headroom > small.activation_headroom
    free = 60 * GiB
    assert large.sampler_memory_fraction(free, 80 * GiB) < small.sampler_memory_fraction(free, 80 * GiB)


def test_headroom_setting_and_env_override_the_estimate(monkeypatch):
    shape = QWEN3["0.6b"]
    assert plan_placement(shape, [gpu()], PlacementSettings(activation_headroom=3 * GiB)).activation_headroom == 3 * GiB
    monkeypatch.setenv(HEADROOM_ENV, "7.5")
    assert PlacementSettings.from_env().activation_headroom == int(7.5 * GiB)
    # An explicit value (the CLI option) wins over the environment.
    assert PlacementSettings.from_env(activation_headroom=GiB).activation_headroom == GiB
    monkeypatch.setenv(HEADROOM_ENV, "lots")
    with pytest.raises(PlacementError, match=HEADROOM_ENV):
        PlacementSettings.from_env()


def test_two_gpus_put_trainer_and_sampler_apart():
    plan = plan_placement(QWEN3["8b"], [gpu(0, 80, used_gb=30), gpu(1, 80, used_gb=60), gpu(2, 80)])
    assert not plan.shared
    assert plan.trainer_device == "cuda:0"  # where the trainer engine goes by default
    assert plan.sampler_device == "cuda:2"  # the other GPU with the most free memory
    # The sampler has its GPU to itself: only the safety margin stays free, capped at 92%.
    assert plan.sampler_memory_fraction(80 * GiB, 80 * GiB) == pytest.approx(0.92)
    assert plan.sampler_memory_fraction(50 * GiB, 80 * GiB) == pytest.approx((50 - 0.5) / 80, abs=1e-3)


def test_8b_does_not_fit_with_a_vllm_sampler_on_one_24gb_gpu():
    with pytest.raises(PlacementError) as e:
        plan_placement(QWEN3["8b"], [gpu(0, 24)])
    msg = str(e.value)
    assert "do not fit together on cuda:0" in msg and "micro_batch_tokens" in msg and HEADROOM_ENV in msg


def test_8b_trainer_alone_cannot_fit_on_two_small_gpus():
    with pytest.raises(PlacementError, match="the trainer needs about"):
        plan_placement(QWEN3["8b"], [gpu(0, 16), gpu(1, 16)])
    # ...but 0.6B fits there, one server per GPU.
    plan = plan_placement(QWEN3["0.6b"], [gpu(0, 16), gpu(1, 16)])
    assert {plan.trainer_device, plan.sampler_device} == {"cuda:0", "cuda:1"}


def test_sampler_refuses_when_the_trainer_left_too_little():
    plan = plan_placement(QWEN3["4b"], [gpu(0, 40)])
    with pytest.raises(PlacementError, match="after the trainer loaded"):
        plan.sampler_memory_fraction(plan.activation_headroom + GiB, 40 * GiB)


def test_hf_sampler_needs_less_than_vllm():
    hf = plan_placement(QWEN3["4b"], [gpu()], PlacementSettings(sampler_engine="hf"))
    vllm = plan_placement(QWEN3["4b"], [gpu()])
    assert hf.sampler_min < vllm.sampler_min


def test_qwen3_4b_at_4x2048_fits_an_80gb_gpu_by_the_estimate():
    resident, headroom = trainer_bytes(QWEN3["4b"], PlacementSettings(micro_batch_tokens=4 * 2048))
    assert resident + headroom < 80 * GiB * 0.5  # the trainer alone is far from the limit
    assert activation_bytes(QWEN3["4b"], PlacementSettings(micro_batch_tokens=8192)) < 8 * GiB


def test_no_gpu_is_a_clear_error_and_plan_for_model_returns_none(tmp_path):
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        plan_placement(QWEN3["0.6b"], [])
    cfg = {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelShape.from_model_dir(tmp_path) == QWEN3["0.6b"]
    assert plan_for_model(tmp_path, gpus=[]) is None
    assert plan_for_model(tmp_path, gpus=[gpu()]).shared


def test_trainer_check_before_loading():
    from loops_backends.local_gpu.placement import check_trainer_fits

    check_trainer_fits(QWEN3["1.7b"], gpu(0, 24))
    with pytest.raises(PlacementError, match="the trainer needs about .* cuda:0 has 10.0 GiB free"):
        check_trainer_fits(QWEN3["8b"], Gpu(0, 24 * GiB, 10 * GiB))


def test_vllm_sampler_share_comes_from_the_plan(monkeypatch):
    """``make_sampler_engine``'s placement step with made-up GPUs (the tiny model's shape)."""
    from loops_backends.local_gpu import placement, samplers

    monkeypatch.delenv(HEADROOM_ENV, raising=False)
    monkeypatch.setattr(placement, "probe_gpus", lambda: [gpu(0, 80, used_gb=20)])
    monkeypatch.setattr(placement, "processes_on_gpus", lambda: {0: [12345], 1: []})  # a trainer on GPU 0
    one = samplers._vllm_placement("loops/tiny-qwen3", 64, None)
    assert 0.5 < one["gpu_memory_utilization"] < 0.75  # 60 GB free minus the trainer's headroom
    tight = samplers._vllm_placement("loops/tiny-qwen3", 64, 30.0)  # --activation-headroom-gb 30
    assert tight["gpu_memory_utilization"] == pytest.approx((60 - 30 - 0.5) / 80, abs=2e-3)
    monkeypatch.setattr(placement, "probe_gpus", lambda: [gpu(0, 80, used_gb=20), gpu(1, 80)])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = samplers._vllm_placement("loops/tiny-qwen3", 64, None)
    assert two["gpu_memory_utilization"] == pytest.approx(0.92)
    import os

    assert os.environ.pop("CUDA_VISIBLE_DEVICES") == "1"  # the sampler's own GPU
    monkeypatch.setattr(placement, "probe_gpus", lambda: [])
    assert samplers._vllm_placement("loops/tiny-qwen3", 64, None) == {}


def test_a_sampler_alone_on_its_gpu_keeps_no_trainer_headroom(monkeypatch):
    from loops_backends.local_gpu import placement, samplers

    plan = plan_placement(QWEN3["8b"], [gpu(0, 24)], sampler_only=True)  # would not fit with a trainer
    assert plan.sampler_device == "cuda:0" and not plan.shared
    monkeypatch.setattr(placement, "probe_gpus", lambda: [gpu(0, 80, used_gb=0.5)])
    monkeypatch.setattr(placement, "processes_on_gpus", lambda: {0: []})  # nobody else on the GPU
    assert samplers._vllm_placement("loops/tiny-qwen3", 64, None)["gpu_memory_utilization"] == pytest.approx(0.92)
    monkeypatch.setattr(placement, "processes_on_gpus", lambda: {0: [12345]})  # the trainer, up first
    assert samplers._vllm_placement("loops/tiny-qwen3", 64, 20.0)["gpu_memory_utilization"] == pytest.approx(
        (79.5 - 20 - 0.5) / 80, abs=2e-3)
    with pytest.raises(PlacementError, match="the sampler needs about"):
        plan_placement(QWEN3["8b"], [gpu(0, 12)], sampler_only=True)


def test_trainer_first_only_on_a_shared_gpu(monkeypatch):
    from loops_backends.local_gpu import placement

    for gpus, first in [([], False), ([gpu(0)], True), ([gpu(0), gpu(1)], False)]:
        monkeypatch.setattr(placement, "probe_gpus", lambda g=gpus: g)
        assert placement.trainer_first() is first
