"""Checkpoints as plain directories under ``LOOPS_HOME``.

::

    $LOOPS_HOME/runs/<run_id>/weights/<name>/           save_state: adapter + Adam state (safetensors)
    $LOOPS_HOME/runs/<run_id>/sampler_weights/<name>/   save_weights_for_sampler: a PEFT adapter dir

Each checkpoint directory holds a ``checkpoint.json`` with its metadata. A checkpoint is addressed
as ``loops://<run_id>/<weights|sampler_weights>/<name>``; the Baseten form
``bt://loops:<run_id>/...``, Tinker's ``tinker://<run_id>/...``, ``file://`` URLs and plain
directory paths are accepted too. Its id is ``<run_id>/<kind>/<name>``.

Nothing leaves the store's root: run ids and names are single path components (no ``..``, no
``/``), and a ``file://`` URL or directory path must resolve (symlinks followed, then checked) to a
directory under the root or under one of the extra roots the server was given
(``LOOPS_CHECKPOINT_ROOTS``, ``os.pathsep``-separated). Any other path is refused with the same
message whether or not it exists. File listings skip symlinks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from .errors import InvalidRequestError, NotFoundError
from .types import Checkpoint, CheckpointFile, CheckpointFilesResponse, LoraAdapterConfig

KINDS = ("weights", "sampler_weights")
META = "checkpoint.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATH = re.compile(r"^(?:loops://|tinker://|bt://loops:)([^/]+)/(weights|sampler_weights)/([^/]+)/?$")
_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def loops_home() -> Path:
    """``LOOPS_HOME`` (read now, not at import), default ``~/.loops``."""
    return Path(os.environ.get("LOOPS_HOME") or Path.home() / ".loops").expanduser()


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidRequestError(
            f"{field}={name!r} is not a valid checkpoint name: use letters, digits, '.', '_' and '-' "
            "(at most 128 characters, starting with a letter or digit)", field=field)
    return name


def checkpoint_uri(run_id: str, kind: str, name: str) -> str:
    return f"loops://{run_id}/{kind}/{name}"


def parse_uri(path: str) -> tuple[str, str, str] | None:
    """``(run_id, kind, name)`` for a checkpoint URI, or None for a file path / URL."""
    m = _PATH.match(path.strip())
    return (m.group(1), m.group(2), m.group(3)) if m else None


def check_run_id(run_id: str, field: str = "run_id") -> str:
    if not isinstance(run_id, str) or not _RUN.match(run_id) or ".." in run_id:
        raise InvalidRequestError(f"{field}={str(run_id)[:80]!r} is not a valid run id: letters, digits, '.', '_', "
                                  "':' and '-' only", field=field)
    return run_id


def extra_roots() -> list[Path]:
    """Directories besides the store's root that checkpoint paths may point into (``LOOPS_CHECKPOINT_ROOTS``)."""
    raw = os.environ.get("LOOPS_CHECKPOINT_ROOTS") or ""
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p]


class CheckpointStore:
    def __init__(self, root: Path | None = None, *, roots: list[Path] | None = None):
        self.root = Path(root) if root else loops_home() / "runs"
        self.roots = roots  # extra roots for file paths; None: read LOOPS_CHECKPOINT_ROOTS when needed

    def dir_for(self, run_id: str, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise InvalidRequestError(f"checkpoint kind {kind[:40]!r} is not one of {KINDS}", field="path")
        return self.root / check_run_id(run_id) / kind / check_name(name)

    def _inside_roots(self, path: str, d: Path) -> Path:
        try:
            real = d.resolve()
        except (OSError, ValueError):
            real = Path("/\0")  # unresolvable: refused below like any path outside the roots
        roots = [self.root.resolve(), *(self.roots if self.roots is not None else extra_roots())]
        if not any(real == r or r in real.parents for r in roots):
            raise InvalidRequestError(
                f"path {path[:200]!r} is outside this server's checkpoint roots: pass a loops:// checkpoint URI, "
                "or start the server with LOOPS_CHECKPOINT_ROOTS naming the directory", field="path")
        return real

    def create(self, run_id: str, kind: str, name: str, *, base_model: str, lora_rank: int,
               write: Callable[[Path], None]) -> tuple[Path, Checkpoint]:
        """Write a checkpoint atomically: ``write(tmp_dir)`` fills it, then it replaces ``name``."""
        assert kind in KINDS
        check_name(name)
        final = self.dir_for(run_id, kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            write(tmp)
            ckpt = Checkpoint(
                id=f"{run_id}/{kind}/{name}", run_id=run_id, checkpoint_id=name,
                checkpoint_type="training" if kind == "weights" else "sampler",
                created_at=datetime.now(timezone.utc).isoformat(), base_model=base_model,
                lora_adapter_config=LoraAdapterConfig(r=lora_rank),
                size_bytes=sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
                target="trainer" if kind == "weights" else "sampler",
                path=checkpoint_uri(run_id, kind, name))
            (tmp / META).write_text(ckpt.model_dump_json(indent=2))
            if final.exists():
                old = final.parent / f".{name}.{uuid.uuid4().hex[:8]}.old"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, ckpt

    def resolve(self, path: str, *, kind: str | None = None) -> Path:
        """The directory for a checkpoint URI, ``file://`` URL or directory path.

        Raises NotFoundError when it does not exist, InvalidRequestError when it is malformed.
        """
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("path must be a checkpoint URI such as loops://<run>/weights/<name>",
                                      field="path")
        parsed = parse_uri(path)
        if parsed:
            run_id, k, name = parsed
            if kind and k != kind:
                raise InvalidRequestError(
                    f"path {path[:200]!r} is a {k} checkpoint; this call needs a {kind} checkpoint", field="path")
            d = self.dir_for(run_id, k, name)
            if d.is_symlink():
                raise InvalidRequestError(f"checkpoint {path[:200]!r} is a symbolic link; refusing it", field="path")
        elif path.startswith("file://"):
            d = self._inside_roots(path, Path(unquote(urlparse(path).path)))
        elif "://" in path:
            raise InvalidRequestError(
                f"path {path[:200]!r} is not a checkpoint this server can read: use loops://<run>/<weights|"
                "sampler_weights>/<name> (or bt://loops:..., tinker://...), file:// or a directory",
                field="path")
        elif "\0" in path:
            raise InvalidRequestError("path holds a NUL character", field="path")
        else:
            d = self._inside_roots(path, Path(path).expanduser())
        try:
            found = d.is_dir()
        except (OSError, ValueError):
            found = False
        if not found:
            raise NotFoundError(f"checkpoint {path[:200]!r} not found", status_code=404)
        if kind == "sampler_weights" and not (d / "adapter_config.json").is_file():
            raise InvalidRequestError(f"{path[:200]!r} is not a LoRA adapter directory (no adapter_config.json)",
                                      field="path")
        return d

    def list(self, run_id: str) -> list[Checkpoint]:
        out = []
        check_run_id(run_id)
        for kind in KINDS:
            base = self.root / run_id / kind
            if not base.is_dir():
                continue
            for d in base.iterdir():
                meta = d / META
                if d.is_dir() and not d.name.startswith(".") and meta.is_file():
                    out.append(Checkpoint.model_validate_json(meta.read_text()))
        return sorted(out, key=lambda c: c.created_at)

    def get(self, checkpoint_id: str) -> tuple[Checkpoint, Path]:
        parts = checkpoint_id.split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            parsed = parse_uri(checkpoint_id)
            if not parsed:
                raise InvalidRequestError(
                    f"checkpoint_id {checkpoint_id!r} is not of the form <run_id>/<weights|sampler_weights>/<name>",
                    field="checkpoint_id")
            parts = list(parsed)
        d = self.dir_for(*parts)
        if d.is_symlink() or not (d / META).is_file():
            raise NotFoundError(f"checkpoint {checkpoint_id!r} not found", status_code=404)
        return Checkpoint.model_validate_json((d / META).read_text()), d

    def files(self, checkpoint_id: str, page_size: int = 1000, page_token: int = 0) -> CheckpointFilesResponse:
        """Every file of a checkpoint as ``file://`` URLs, a page at a time."""
        if page_size <= 0 or page_token < 0:
            raise InvalidRequestError("page_size must be > 0 and page_token >= 0", field="page_size")
        _, d = self.get(checkpoint_id)
        files = sorted(p for p in d.rglob("*") if p.is_file() and not is_linked(p, d))
        page = files[page_token:page_token + page_size]
        nxt = page_token + page_size
        return CheckpointFilesResponse(
            presigned_urls=[
                CheckpointFile(url=p.resolve().as_uri(), relative_file_name=str(p.relative_to(d)), node_rank=0,
                               size_bytes=p.stat().st_size,
                               last_modified=datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).isoformat())
                for p in page],
            next_page_token=nxt if nxt < len(files) else None, total_count=len(files))

    def delete(self, checkpoint_id: str) -> None:
        _, d = self.get(checkpoint_id)
        shutil.rmtree(d)


def is_linked(p: Path, top: Path) -> bool:
    """True when ``p`` or a directory between it and ``top`` is a symbolic link (never followed)."""
    while p != top and p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def read_meta(directory: Path) -> dict:
    p = directory / META
    return json.loads(p.read_text()) if p.is_file() else {}
