"""Downloading a checkpoint's files into a directory, from any backend's file listing.

``https://`` (presigned) and ``file://`` URLs are both fetched. Files are fetched in parallel (``concurrency`` at a time) without the API key: presigned URLs
carry their own authorisation, and the key must not travel to a storage host. Each file is
streamed to ``<name>.part`` and renamed when complete; its size must equal ``size_bytes``. A
destination that is not empty is refused; on any failure the files written so far are removed.
Symbolic links are never followed: a ``file://`` source that is a link (or under a linked directory)
is refused (listings skip linked directories), and no file name may step out of the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import httpx

from .errors import APIError, APIStatusError, InvalidRequestError
from .types import CheckpointDownload, CheckpointFile
from .wire import raise_for_status, ssl_context, translate_errors

DOWNLOAD_TIMEOUT = 600.0


def prepare_dest(dest_dir: str | Path) -> Path:
    dest = Path(dest_dir).expanduser()
    if dest.exists() and not dest.is_dir():
        raise InvalidRequestError(f"dest_dir {str(dest)!r} exists and is not a directory", field="dest_dir")
    if dest.is_dir() and any(dest.iterdir()):
        raise InvalidRequestError(f"dest_dir {str(dest)!r} is not empty; download into a new or empty directory",
                                  field="dest_dir")
    return dest


def target_path(dest: Path, relative: str) -> Path:
    rel = PurePosixPath(relative)
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise APIError(f"refusing checkpoint file name {relative!r}: it would land outside the destination")
    return dest.joinpath(*rel.parts)


async def download_files(files: list[CheckpointFile], dest_dir: str | Path, *, concurrency: int = 8,
                         transport: httpx.AsyncBaseTransport | None = None) -> CheckpointDownload:
    dest = prepare_dest(dest_dir)
    for f in files:
        scheme = urlparse(f.url).scheme
        if scheme not in ("http", "https", "file"):
            raise InvalidRequestError(
                f"cannot download {scheme}:// URLs ({f.relative_file_name}); fetch them with the backend's own "
                "tools (e.g. `modal volume get` for modal-volume://)", field="checkpoint_id")
    targets = [(f, target_path(dest, f.relative_file_name)) for f in files]
    dest.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(max(1, concurrency))
    written: list[Path] = []

    async with httpx.AsyncClient(transport=transport, verify=ssl_context(), timeout=httpx.Timeout(DOWNLOAD_TIMEOUT, connect=10.0),
                                 follow_redirects=True) as client:
        async def one(f: CheckpointFile, path: Path) -> int:
            async with gate:
                return await _fetch(client, f, path, written)

        tasks = [asyncio.create_task(one(f, p)) for f, p in targets]
        try:
            sizes = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
    return CheckpointDownload(dest_dir=str(dest), file_count=len(sizes), bytes_written=sum(sizes))


async def _fetch(client: httpx.AsyncClient, f: CheckpointFile, path: Path, written: list[Path]) -> int:
    where = f.url.split("?", 1)[0]  # the query holds the presigned signature: keep it out of messages
    what = f"download {f.relative_file_name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    written.append(part)
    n = 0
    if f.url.startswith("file://"):  # local and fake backends list their files by path
        src = Path(unquote(urlparse(f.url).path))
        try:
            n = await asyncio.to_thread(_copy_no_links, src, part)
        except OSError as exc:
            raise APIError(f"{what}: cannot copy {src}: {exc}") from exc
    else:
        n = await _stream(client, f, part, what, where)
    if f.size_bytes is not None and n != f.size_bytes:
        raise APIError(f"{what}: received {n} bytes but the listing says {f.size_bytes}; the download is "
                       "incomplete or the file changed (try again)")
    part.replace(path)
    written.append(path)
    return n


def _copy_no_links(src: Path, dest: Path) -> int:
    """Copy ``src`` to ``dest``; refuse if ``src`` is a symbolic link (listings skip linked directories)."""
    if src.is_symlink():
        raise OSError(f"{src} is a symbolic link; refusing to follow it")
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as inp, open(dest, "wb") as out:
        shutil.copyfileobj(inp, out, 1 << 20)
        return out.tell()


async def _stream(client: httpx.AsyncClient, f: CheckpointFile, part: Path, what: str, where: str) -> int:
    n = 0
    with translate_errors(what, where):
        async with client.stream("GET", f.url) as r:
            if r.status_code in (401, 403):
                raise APIStatusError(f"{what}: the storage host refused the presigned URL (HTTP {r.status_code}); "
                                     "it may have expired: list the checkpoint's files again", status_code=r.status_code)
            if r.status_code >= 400:
                await r.aread()
                raise_for_status(r, what)
            with open(part, "wb") as out:
                async for chunk in r.aiter_bytes(1 << 20):
                    out.write(chunk)
                    n += len(chunk)
    return n
