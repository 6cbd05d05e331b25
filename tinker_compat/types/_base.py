"""The two pydantic bases of Tinker's types: both frozen; requests forbid unknown fields, responses ignore them."""

from __future__ import annotations

import pydantic


class StrictBase(pydantic.BaseModel):
    """Request types: a misspelt field fails at once."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class BaseModel(pydantic.BaseModel):
    """Response types: fields a newer server adds are ignored."""

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)
