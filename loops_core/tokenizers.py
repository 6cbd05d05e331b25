"""Loading the tokenizer a server names in ``get_info().model_data.tokenizer_id``.

``loops/fake-...`` ids load the fake backend's byte tokenizer; ``loops/tiny-qwen3`` the built-in
tiny model's; anything else goes to ``transformers.AutoTokenizer.from_pretrained`` (a hub id or a
local directory). Loaded tokenizers are cached.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .errors import BackendUnavailableError


@lru_cache(maxsize=16)
def load_tokenizer(tokenizer_id: str) -> Any:
    if tokenizer_id.startswith("loops/fake"):
        from loops_backends.fake.tokenizer import load_fake_tokenizer

        return load_fake_tokenizer(tokenizer_id)
    if tokenizer_id == "loops/tiny-qwen3":
        from loops_backends.local_gpu.tiny_model import tiny_model_path

        tokenizer_id = str(tiny_model_path())
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailableError("tokenizer", "local", exc) from exc
    return AutoTokenizer.from_pretrained(tokenizer_id)
