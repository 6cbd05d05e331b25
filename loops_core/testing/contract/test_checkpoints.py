"""Contract: checkpoints are directories that round-trip, and resumption is exact."""

from __future__ import annotations

import asyncio
import math

import pytest

from loops_core import AdamParams, Checkpoint, CheckpointFilesResponse, InvalidRequestError, LoopsError
from loops_core.testing.contract.data import france, logprobs_of, sft_datum
from loops_core.testing.plugin import CONTRACT_RANK

LR = AdamParams(learning_rate=2e-2, grad_clip_norm=1.0, weight_decay=0.01)

pytestmark = pytest.mark.requires("checkpoints")


def test_download_checkpoint_fetches_every_file(tc, service, tmp_path):
    tc.save_weights_for_sampler("to-download").result(timeout=600)
    ckpt = next(c for c in tc.list_checkpoints() if c.checkpoint_id == "to-download")
    listing = service.get_checkpoint_archive_url(ckpt.id)
    out = service.download_checkpoint(ckpt.id, dest_dir=tmp_path / "adapter")
    assert out.file_count == listing.total_count and out.bytes_written == sum(f.size_bytes for f in listing.presigned_urls)
    for f in listing.presigned_urls:
        assert (tmp_path / "adapter" / f.relative_file_name).stat().st_size == f.size_bytes
    assert (tmp_path / "adapter" / "adapter_config.json").is_file(), "a sampler checkpoint is a PEFT adapter dir"
    with pytest.raises(InvalidRequestError):  # a non-empty destination is refused, nothing is overwritten
        service.download_checkpoint(ckpt.id, dest_dir=tmp_path / "adapter")

    async def run():
        return await tc.download_checkpoint_async(ckpt.id, dest_dir=tmp_path / "again")

    assert asyncio.run(run()).file_count == out.file_count
    assert tc.download_checkpoint(ckpt.id, dest_dir=tmp_path / "third").bytes_written == out.bytes_written

    async def via_service():
        return await service.download_checkpoint_async(ckpt.id, dest_dir=tmp_path / "fourth")

    assert asyncio.run(via_service()).file_count == out.file_count


def test_save_list_and_fetch_files(tc, service):
    saved = tc.save_state("contract-state").result(timeout=600)
    assert saved.path
    mine = [c for c in tc.list_checkpoints() if c.checkpoint_id == "contract-state"]
    assert mine and isinstance(mine[0], Checkpoint) and mine[0].run_id == tc.run_id
    assert any(c.checkpoint_id == "contract-state" for c in service.list_checkpoints(tc.run_id))
    files = tc.get_checkpoint_archive_url(mine[0].id)
    assert isinstance(files, CheckpointFilesResponse) and files.total_count == len(files.presigned_urls) > 0
    assert all(f.size_bytes > 0 and f.url for f in files.presigned_urls)
    first = service.get_checkpoint_archive_url(mine[0].id, page_size=1)
    assert len(first.presigned_urls) == 1 and (first.next_page_token == 1 or files.total_count == 1)

    async def run():
        a = await service.list_checkpoints_async(tc.run_id)
        b = await tc.list_checkpoints_async()
        c = await tc.get_checkpoint_archive_url_async(mine[0].id)
        d = await service.get_checkpoint_archive_url_async(mine[0].id)
        e = await service.get_server_capabilities_async()
        return a, b, c, d, e

    a, b, c, d, _ = asyncio.run(run())
    assert len(a) >= 1 and len(b) >= 1 and c.total_count == d.total_count


def test_load_state_restores_weights(tc):
    datum = sft_datum(*france(tc.get_tokenizer()))
    for _ in range(2):
        tc.forward_backward([datum]).result(timeout=600)
        tc.optim_step(LR).result(timeout=600)
    saved = tc.save_state("restore-me").result(timeout=600)
    at_save = logprobs_of(tc.forward([datum]).result(timeout=600))
    tc.init_trainer_server(8, seed=99).result(timeout=600)
    assert logprobs_of(tc.forward([datum]).result(timeout=600)) != pytest.approx(at_save, nan_ok=True)
    tc.load_state(saved.path).result(timeout=600)
    assert logprobs_of(tc.forward([datum]).result(timeout=600)) == pytest.approx(at_save, nan_ok=True, rel=1e-5)

    async def run():
        return await (await tc.load_state_async(saved.path)), await (await tc.save_state_async("restore-me-2"))

    loaded, again = asyncio.run(run())
    assert again.path


def test_resume_with_optimizer_matches_uninterrupted_run(tc):
    datum = sft_datum(*france(tc.get_tokenizer()))

    def steps(n):
        out = []
        for _ in range(n):
            out.append(tc.forward_backward([datum]).result(timeout=600).loss)
            tc.optim_step(LR).result(timeout=600)
        return out

    straight = steps(5)
    tc.init_trainer_server(8, seed=1234).result(timeout=600)
    first = steps(2)
    saved = tc.save_state("resume-point").result(timeout=600)
    steps(2)  # wander off, then come back
    tc.load_state_with_optimizer(saved.path).result(timeout=600)
    rest = steps(3)

    async def run():
        return await (await tc.load_state_with_optimizer_async(saved.path))

    assert asyncio.run(run()) is not None
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(first + rest, straight)), (
        first + rest, straight)


def test_training_client_from_state(tc, service):
    datum = sft_datum(*france(tc.get_tokenizer()))
    tc.forward_backward([datum]).result(timeout=600)
    tc.optim_step(LR).result(timeout=600)
    saved = tc.save_state("from-state").result(timeout=600)
    at_save = logprobs_of(tc.forward([datum]).result(timeout=600))
    model = tc.get_info().model_name
    restored = service.create_training_client_from_state(saved.path, base_model=model, rank=CONTRACT_RANK)
    assert logprobs_of(restored.forward([datum]).result(timeout=600)) == pytest.approx(at_save, nan_ok=True, rel=1e-5)

    async def run():
        return await service.create_training_client_from_state_async(saved.path, base_model=model, rank=CONTRACT_RANK,
                                                                      with_optimizer=True)

    resumed = asyncio.run(run())
    assert logprobs_of(resumed.forward([datum]).result(timeout=600)) == pytest.approx(at_save, nan_ok=True, rel=1e-5)


@pytest.mark.requires("checkpoint_delete")
def test_delete_checkpoint(tc, service):
    saved = tc.save_state("doomed").result(timeout=600)
    doomed = [c for c in tc.list_checkpoints() if c.checkpoint_id == "doomed"]
    assert doomed and saved.path
    service.delete_checkpoint(doomed[0].id)
    assert not [c for c in tc.list_checkpoints() if c.checkpoint_id == "doomed"]
    with pytest.raises(LoopsError):
        tc.load_state(saved.path).result(timeout=600)
    tc.save_state("doomed-2").result(timeout=600)
    again = [c for c in tc.list_checkpoints() if c.checkpoint_id == "doomed-2"]
    asyncio.run(service.delete_checkpoint_async(again[0].id))
    assert not [c for c in tc.list_checkpoints() if c.checkpoint_id == "doomed-2"]
