"""ModelInput: a tokenized prompt as a list of text and image chunks."""

from __future__ import annotations

import base64
from typing import Any, Literal, Union

from pydantic import Field, field_serializer, field_validator
from typing_extensions import Annotated

from ._base import Request


class EncodedTextChunk(Request):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(Request):
    """An image, sent as standard base64; it occupies ``expected_tokens`` positions."""

    type: Literal["image"] = "image"
    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int = Field(gt=0)

    @field_validator("data", mode="before")
    @classmethod
    def _decode(cls, v: Any) -> bytes:
        if isinstance(v, str):
            return base64.b64decode(v, validate=True)
        return v

    @field_serializer("data")
    def _encode(self, v: bytes) -> str:
        return base64.b64encode(v).decode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, format: Literal["png", "jpeg"], expected_tokens: int) -> "ImageChunk":
        return cls(data=data, format=format, expected_tokens=expected_tokens)

    def to_bytes(self) -> bytes:
        return self.data

    @property
    def length(self) -> int:
        return self.expected_tokens


ModelInputChunk = Annotated[Union[EncodedTextChunk, ImageChunk], Field(discriminator="type")]


class ModelInput(Request):
    """A tokenized prompt: a list of chunks. Build it with ``ModelInput.from_ints(ids)``."""

    chunks: list[ModelInputChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for c in self.chunks:
            if not isinstance(c, EncodedTextChunk):
                raise ValueError("ModelInput.to_ints: the input holds a non-text chunk (an image)")
            out.extend(c.tokens)
        return out

    def append(self, chunk: EncodedTextChunk | ImageChunk) -> "ModelInput":
        """A new ModelInput with ``chunk`` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> "ModelInput":
        return self.append(EncodedTextChunk(tokens=[token]))
