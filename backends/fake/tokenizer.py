"""A deterministic byte-level tokenizer with just enough of the HF ``PreTrainedTokenizer`` surface
for scripts written against ``transformers`` tokenizers to run on the fake backend.

Vocabulary: ids 0..255 are the UTF-8 bytes, then three special tokens: ``<|endoftext|>`` (256,
eos and pad), ``<|im_start|>`` (257) and ``<|im_end|>`` (258); ``vocab_size`` is 259. There is no
BOS token. As in HF tokenizers, special-token strings that appear in text are encoded as their
ids, which is how ``apply_chat_template(tokenize=True)`` maps the ChatML markers.

``base_vocabulary`` picks a fake engine's vocabulary: the base model's own tokenizer where one
resolves offline, else this one.
"""

from __future__ import annotations

import functools
import numbers
import re
from pathlib import Path
from typing import Any, Iterable

FAKE_TOKENIZER_ID = "loops/fake-bytes"

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The same ChatML format Qwen-style chat templates produce, for scripts that print the template.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class FakeTokenizer:
    """Bytes plus three ChatML special tokens; see the module docstring."""

    def __init__(self, name_or_path: str = FAKE_TOKENIZER_ID) -> None:
        self.name_or_path = name_or_path
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(_SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        self.vocab_size = 256 + len(_SPECIAL_TOKENS)
        self.eos_token = "<|endoftext|>"
        self.eos_token_id = self._special_to_id[self.eos_token]
        self.pad_token = self.eos_token
        self.pad_token_id = self.eos_token_id
        self.bos_token: str | None = None
        self.bos_token_id: int | None = None
        self.unk_token: str | None = None
        self.unk_token_id: int | None = None
        self.all_special_tokens = list(_SPECIAL_TOKENS)
        self.all_special_ids = [self._special_to_id[t] for t in _SPECIAL_TOKENS]
        self.chat_template = _CHAT_TEMPLATE
        self.padding_side = "right"
        self.model_max_length = 4096
        # Splits text at special-token strings (kept, thanks to the capturing group).
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in _SPECIAL_TOKENS) + ")")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"FakeTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """UTF-8 bytes of ``text``, special-token strings as their ids. ``add_special_tokens`` is
        accepted for compatibility and adds nothing (there is no BOS)."""
        ids: list[int] = []
        for piece in self._split_re.split(text):
            if piece in self._special_to_id:
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 **kwargs: Any) -> dict[str, Any]:
        if isinstance(text, str):
            ids = self.encode(text)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        rows = [self.encode(t) for t in text]
        return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}

    # ---- decoding ---------------------------------------------------------------------------
    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False,
               **kwargs: Any) -> str:
        """Bytes decoded as UTF-8 with ``errors="replace"``; special tokens as their text unless
        skipped. Runs of bytes are decoded together so multi-byte characters survive."""
        if isinstance(ids, numbers.Integral):  # one id (numpy integers count too)
            ids = [int(ids)]
        out: list[str] = []
        buf = bytearray()
        for i in (int(t) for t in ids):  # type: ignore[union-attr]
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._id_to_special:
                raise ValueError(f"token id {i} is outside the fake vocabulary [0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                out.append(self._id_to_special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False,
                     **kwargs: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Printable ASCII bytes as themselves, other bytes as ``<0xNN>``, specials as their text."""
        if isinstance(ids, numbers.Integral):
            return self._id_to_token(int(ids))
        return [self._id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return {self._id_to_token(i): i for i in range(self.vocab_size)}

    def _id_to_token(self, i: int) -> str:
        if i in self._id_to_special:
            return self._id_to_special[i]
        if not 0 <= i < 256:
            raise ValueError(f"token id {i} is outside the fake vocabulary [0, {self.vocab_size})")
        return chr(i) if 0x20 <= i < 0x7F else f"<0x{i:02X}>"

    def _token_to_id(self, token: str) -> int:
        if token in self._special_to_id:
            return self._special_to_id[token]
        if len(token) == 1 and 0x20 <= ord(token) < 0x7F:
            return ord(token)
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
        if m:
            return int(m.group(1), 16)
        raise KeyError(f"{token!r} is not a token of the fake vocabulary")

    # ---- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str | list[int]:
        """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
        ``<|im_start|>assistant\\n`` with ``add_generation_prompt``. Other HF keyword arguments
        (``tools``, ``enable_thinking``, ...) are accepted and ignored."""
        parts = [f"<|im_start|>{m['role']}\n{_content_text(m.get('content'))}<|im_end|>\n"
                 for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text


def _content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI-style parts list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def load_fake_tokenizer(tokenizer_id: str = FAKE_TOKENIZER_ID) -> FakeTokenizer:
    """The fake tokenizer. Every ``loops/fake...`` id (the prefix ``loops_core.tokenizers`` routes
    here) names the same byte vocabulary; other ids are an error."""
    if not tokenizer_id.startswith("loops/fake"):
        raise ValueError(f"the fake tokenizer loader only knows ids starting with 'loops/fake' "
                         f"(such as {FAKE_TOKENIZER_ID!r}), not {tokenizer_id!r}")
    return FakeTokenizer(tokenizer_id)


# The fake model is a dense [V, V] float64 table: 4096 ids make it 128 MiB, the most we allow.
# Larger vocabularies (real hub models: ~150k ids) keep the byte vocabulary.
MAX_MODEL_VOCAB = 4096


@functools.lru_cache(maxsize=16)
def base_vocabulary(base_model: str) -> tuple[Any, str]:
    """``(tokenizer, tokenizer_id)`` for a fake engine running ``base_model``.

    The base model's own tokenizer when one resolves without a download — ``loops/tiny-qwen3``,
    a local model directory, or a hub id already in the local cache — so code that tokenizes with
    the model's HF tokenizer (Tinker's cookbook does) sends ids the fake model knows. Otherwise
    (no ``transformers``, nothing cached, a vocabulary over ``MAX_MODEL_VOCAB``) the byte tokenizer.
    """
    found = _model_tokenizer(base_model)
    if found is None or len(found[0]) > MAX_MODEL_VOCAB:
        return load_fake_tokenizer(), FAKE_TOKENIZER_ID
    return found


def _model_tokenizer(base_model: str) -> tuple[Any, str] | None:
    source = _tokenizer_source(base_model)
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=True), base_model
    except Exception:  # no transformers, or not a loadable tokenizer: the byte vocabulary
        return None


def _tokenizer_source(base_model: str) -> str | None:
    """Where the base model's tokenizer is on this machine, without importing transformers (slow)."""
    try:
        if base_model.startswith("loops/fake"):
            return None
        if base_model == "loops/tiny-qwen3":
            from loops_backends.local_gpu.tiny_model import tiny_model_path

            return str(tiny_model_path())  # generated once under LOOPS_HOME (needs torch the first time)
        local = Path(base_model).expanduser()
        if local.is_dir():
            return str(local) if any((local / f).is_file() for f in _TOKENIZER_FILES) else None
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(base_model, f), str) for f in _TOKENIZER_FILES)
        return base_model if cached else None
    except Exception:  # a malformed id, a missing extra
        return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
