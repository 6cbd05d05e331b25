"""What Tinker's REST API knows about runs that loops does not keep: their ``user_metadata``.

A run created through the shim gets a record ``$LOOPS_HOME/tinker_runs/<run_id>.json`` (base
model, LoRA rank, the ``train_*`` flags, ``user_metadata``, per-checkpoint metadata): the shim's
own file, beside (never inside) loops' checkpoint store. The record stays on the machine that
created the run, so ``RestClient.get_training_run*`` finds the metadata only there; checkpoints
themselves come from loops' public listing (``ServiceClient.list_checkpoints``).

Also here: loops checkpoint URIs and records in Tinker's shape (``tinker://`` paths).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loops_core.checkpoints import loops_home
from loops_core.types import Checkpoint as LoopsCheckpoint

from . import types

RECORDS = "tinker_runs"
_lock = threading.Lock()


def record_path(run_id: str) -> Path:
    return loops_home() / RECORDS / f"{run_id}.json"


def read_run(run_id: str) -> dict[str, Any] | None:
    p = record_path(run_id)
    return json.loads(p.read_text()) if p.is_file() else None


def update_run(run_id: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's record (written atomically); ``checkpoints`` merges per key."""
    with _lock:
        record = read_run(run_id) or {"training_run_id": run_id,
                                      "created_at": datetime.now(timezone.utc).isoformat()}
        checkpoints = {**record.get("checkpoints", {}), **fields.pop("checkpoints", {})}
        record.update(fields, checkpoints=checkpoints, updated_at=datetime.now(timezone.utc).isoformat())
        _write(run_id, record)
        return record


def forget_checkpoint(run_id: str, key: str) -> None:
    """Drop a deleted checkpoint's metadata from the run's record."""
    with _lock:
        record = read_run(run_id)
        if record is not None and record.get("checkpoints", {}).pop(key, 0) != 0:
            _write(run_id, record)


def _write(run_id: str, record: dict[str, Any]) -> None:
    p = record_path(run_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, p)


def checkpoint_key(c: LoopsCheckpoint) -> str:
    """Tinker's ``checkpoint_id``: ``<weights|sampler_weights>/<name>``."""
    return f"{'weights' if c.checkpoint_type == 'training' else 'sampler_weights'}/{c.checkpoint_id}"


def to_tinker_checkpoint(c: LoopsCheckpoint, record: dict[str, Any] | None) -> types.Checkpoint:
    key = checkpoint_key(c)
    meta = (record or {}).get("checkpoints", {}).get(key)
    return types.Checkpoint(
        checkpoint_id=key, checkpoint_type="training" if c.checkpoint_type == "training" else "sampler",
        time=datetime.fromisoformat(c.created_at), tinker_path=f"tinker://{c.run_id}/{key}",
        size_bytes=c.size_bytes, user_metadata=meta)


def training_run(run_id: str, checkpoints: list[LoopsCheckpoint]) -> types.TrainingRun | None:
    """The run in Tinker's shape, from its record and checkpoints (None when neither exists)."""
    record = read_run(run_id)
    if record is None and not checkpoints:
        return None
    record = record or {}
    ours = [to_tinker_checkpoint(c, record) for c in checkpoints]
    training = [c for c in ours if c.checkpoint_type == "training"]
    sampler = [c for c in ours if c.checkpoint_type == "sampler"]
    first = checkpoints[0] if checkpoints else None
    rank = record.get("lora_rank") or (first.lora_adapter_config.r if first and first.lora_adapter_config else None)
    times = [c.time for c in ours]
    if record.get("updated_at"):
        times.append(datetime.fromisoformat(record["updated_at"]))
    return types.TrainingRun(
        training_run_id=run_id, base_model=record.get("base_model") or (first.base_model if first else "") or "",
        model_owner=record.get("model_owner") or os.environ.get("USER") or "loops", is_lora=True,
        lora_rank=rank, last_request_time=max(times),
        last_checkpoint=max(training, key=lambda c: c.time, default=None),
        last_sampler_checkpoint=max(sampler, key=lambda c: c.time, default=None),
        user_metadata=record.get("user_metadata"))
