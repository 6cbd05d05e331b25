"""``ModelInput`` and its chunks: frozen pydantic models, as in Tinker."""

from __future__ import annotations

import base64
from typing import List, Literal, Optional, Sequence, Union

from pydantic import field_serializer, field_validator

from ._base import StrictBase

__all__ = ["DmelChunk", "EncodedTextChunk", "ImageAssetPointerChunk", "ImageChunk", "ModelInput",
           "ModelInputChunk"]


class EncodedTextChunk(StrictBase):
    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(StrictBase):
    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: Optional[int] = None  # advisory; needed for ``length``
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def validate_data(cls, value: Union[bytes, str]) -> bytes:
        return base64.b64decode(value) if isinstance(value, str) else value

    @field_serializer("data")
    def serialize_data(self, value: bytes) -> str:
        return base64.b64encode(value).decode()

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageChunk expected_tokens needs to be set in order to compute the length")
        return self.expected_tokens


class ImageAssetPointerChunk(StrictBase):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: Optional[int] = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageAssetPointerChunk expected_tokens needs to be set in order to compute the length")
        return self.expected_tokens


class DmelChunk(StrictBase):
    """Audio features; loops engines take text and images only, so training or sampling on one fails."""

    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @field_validator("dmel", mode="before")
    @classmethod
    def validate_dmel(cls, value: Union[bytes, str]) -> bytes:
        return base64.b64decode(value) if isinstance(value, str) else value

    @field_serializer("dmel")
    def serialize_dmel(self, value: bytes) -> str:
        return base64.b64encode(value).decode()

    @property
    def length(self) -> int:
        raise ValueError("DmelChunk (audio) is not supported by loops backends, so it has no token length here")


ModelInputChunk = Union[EncodedTextChunk, ImageChunk, ImageAssetPointerChunk, DmelChunk]


class ModelInput(StrictBase):
    chunks: List[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: List[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    def to_ints(self) -> List[int]:
        if not all(isinstance(chunk, EncodedTextChunk) for chunk in self.chunks):
            raise ValueError("to_ints only supported for ModelInput with EncodedTextChunks, got "
                             f"{[type(chunk) for chunk in self.chunks]}")
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))
