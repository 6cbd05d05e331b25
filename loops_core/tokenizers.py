"""Loading the tokenizer a server names in ``get_info().model_data.tokenizer_id``.

Backends register loaders for their own ids through the ``register_tokenizers`` hook (the fake
byte tokenizer, the built-in tiny model); any other id goes to
``transformers.AutoTokenizer.from_pretrained`` (a hub id or a local directory). Loaded tokenizers
are cached.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError


def tokenizer_loaders() -> dict[str, Any]:
    """Registered loaders by id prefix (longest prefix first; the first plugin to claim a prefix wins)."""
    from .plugins import registrations

    found: dict[str, Any] = {}
    for prefix, target in registrations("register_tokenizers"):
        found.setdefault(prefix, target)
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


@lru_cache(maxsize=16)
def load_tokenizer(tokenizer_id: str) -> Any:
    from .plugins import resolve_target

    source: Any = tokenizer_id
    for prefix, target in tokenizer_loaders().items():
        if tokenizer_id.startswith(prefix):
            source = resolve_target(target)(tokenizer_id)
            break
    if not isinstance(source, (str, Path)):
        return source
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailableError("tokenizer", "local", exc) from exc
    return AutoTokenizer.from_pretrained(str(source))
