"""The Baseten emulator's checkpoint routes: listing, presigned file pages, and the downloads.

Files come from the ``LOOPS_HOME`` checkpoint store the emulated servers write. Their URLs point
back at the emulator (``/_files``) with an expiry time and an HMAC signature in the query, like
presigned storage URLs: they need no API key, and an expired or altered URL answers 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from loops_core.checkpoints import is_linked, read_meta
from loops_core.errors import InvalidRequestError, NotFoundError
from loops_core.server.http import guarded, json_body

from .emulator_faults import base_url, error

if TYPE_CHECKING:  # pragma: no cover
    from .emulator import Emulator


class CheckpointRoutes:
    def __init__(self, emulator: "Emulator"):
        self.emu = emulator
        self._secret = secrets.token_bytes(32)

    @guarded
    async def list(self, request: Request) -> Response:
        q = request.query_params
        if q.get("checkpoint_path"):
            directory = self.emu.store.resolve(q["checkpoint_path"])
            meta = read_meta(directory)
            return JSONResponse({"checkpoints": [meta] if meta else []})
        if not q.get("run_id"):
            raise InvalidRequestError("pass run_id or checkpoint_path", field="run_id")
        return JSONResponse({"checkpoints": [c.model_dump(mode="json") for c in self.emu.store.list(q["run_id"])]})

    @guarded
    async def files(self, request: Request) -> Response:
        q = request.query_params
        try:
            size, token = int(q.get("page_size", 1000)), int(q.get("page_token", 0))
        except ValueError:
            raise InvalidRequestError("page_size and page_token must be integers", field="page_size") from None
        cid = request.path_params["cid"]
        page = self.emu.store.files(cid, size, token)
        expires = int(time.time() + self.emu.url_ttl_s)
        for f in page.presigned_urls:
            query = urlencode({"checkpoint": cid, "file": f.relative_file_name, "expires": expires,
                               "signature": self._sign(cid, f.relative_file_name, expires)})
            f.url = f"{base_url(request)}/_files?{query}"
        return JSONResponse(page.model_dump(mode="json"))

    @guarded
    async def source(self, request: Request) -> Response:
        """Where the files come from: always presigned URLs here (the real service may name a volume)."""
        self.emu.store.get(request.path_params["cid"])  # 404 for an unknown id
        return JSONResponse({"source": {"kind": "s3"}})

    @guarded
    async def validate(self, request: Request) -> Response:
        """``POST /v1/loops/checkpoints/validate {checkpoint_path, run_id}``: 200 when the path names a
        checkpoint this key can read, 400 when it is malformed, 404 when there is none."""
        body = await json_body(request)
        path = body.get("checkpoint_path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("checkpoint_path is required (a bt://loops:<run>/... path)",
                                      field="checkpoint_path")
        meta = read_meta(self.emu.store.resolve(path))
        return JSONResponse({"valid": True, "checkpoint": meta})

    def _sign(self, cid: str, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{cid}\n{name}\n{expires}".encode(), hashlib.sha256).hexdigest()

    @guarded
    async def download(self, request: Request) -> Response:
        q = request.query_params
        cid, name = q.get("checkpoint", ""), q.get("file", "")
        try:
            expires = int(q.get("expires", "0"))
        except ValueError:
            expires = 0
        if not hmac.compare_digest(self._sign(cid, name, expires), q.get("signature", "")):
            return error(403, "signature does not match")
        if time.time() > expires:
            return error(403, "request has expired")
        _, directory = self.emu.store.get(cid)  # the store refuses ids that leave its root
        path = directory / name
        # Links are never followed: neither the file nor a directory between it and the checkpoint.
        if is_linked(path, directory) or directory.resolve() not in path.resolve().parents or not path.is_file():
            raise NotFoundError(f"no file {name[:200]!r} in {cid[:200]!r}", status_code=404)
        data = path.read_bytes()
        if self.emu.faults.short_files:
            data = data[:-1]
        return Response(data, media_type="application/octet-stream")
