"""Process statistics a server reports at ``GET /stats`` (benchmarks read peak memory there)."""

from __future__ import annotations

import resource
import sys
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def process_stats() -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")  # only if the engine already imported it
    if torch is not None and torch.cuda.is_available():
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


async def stats_route(request: Request) -> JSONResponse:
    return JSONResponse(process_stats())
