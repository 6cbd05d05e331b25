"""The two bases: requests forbid unknown fields, responses ignore them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Request(BaseModel):
    """Base of every type a user builds: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Response(BaseModel):
    """Base of every type a server returns: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
