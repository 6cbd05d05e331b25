"""A status line while something slow happens (provisioning a trainer takes seconds to minutes).

Shown on a terminal only (tqdm's ``disable=None``), so logs and CI output stay clean.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from tqdm.auto import tqdm


@contextlib.asynccontextmanager
async def status(description: str, *, tick: float = 0.5) -> AsyncIterator[None]:
    bar = tqdm(desc=description, total=None, bar_format="{desc}: {elapsed}", disable=None, leave=False)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(tick)
            bar.refresh()

    ticker = asyncio.ensure_future(refresh())
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        bar.close()
