"""Datum: one training example, its loss inputs, and optional provenance spans."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator
from typing_extensions import Annotated

from ._base import Request
from .model_input import ModelInput
from .tensor import DType, TensorData

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dpo", "dppo", "gspo",
                     "stable_reinforce"]

# The dtype a plain list gets when a Datum is built from it, by key name (as in Tinker).
KEY_DTYPES: dict[str, DType] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "ref_logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Convert a torch tensor, numpy array or plain list into TensorData (by key name for lists)."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    mod = type(value).__module__
    if mod.startswith("torch"):
        return TensorData.from_torch(value)
    if mod.startswith("numpy"):
        return TensorData.from_numpy(value)
    if isinstance(value, (list, tuple)):
        if key not in KEY_DTYPES:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] is a plain list and {key!r} is not a known key; "
                "wrap it as TensorData(data=..., dtype=..., shape=...)"
            )
        return TensorData.from_list(list(value), KEY_DTYPES[key])
    raise ValueError(f"loss_fn_inputs[{key!r}] has unsupported type {type(value).__name__}")


class PromptProvenanceSpan(Request):
    """Datum positions that were positions ``[offset, offset + length)`` of the prompt of the
    sample request that returned ``sequence_id``."""

    type: Literal["prompt"] = "prompt"
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)


class SampledProvenanceSpan(Request):
    """Datum positions that were tokens ``[offset, offset + length)`` sampled as ``sequence_id``."""

    type: Literal["sampled"] = "sampled"
    sequence_id: str = Field(min_length=1)
    offset: int = Field(default=0, ge=0)
    length: int = Field(ge=0)


ProvenanceSpan = Annotated[Union[PromptProvenanceSpan, SampledProvenanceSpan], Field(discriminator="type")]


class Datum(Request):
    """One training example: a ModelInput and its per-position loss inputs.

    ``loss_fn_inputs[k]`` has one entry per input position: ``target_tokens[i]`` is the label for
    the prediction made at position ``i``. Values may be TensorData, torch tensors, numpy arrays or
    plain lists (whose dtype comes from the key name).

    Provenance (needed by ``stable_reinforce``): ``model_input_spans`` tile the input tokens and
    ``loss_fn_input_spans`` tile ``target_tokens``, run by run, naming the sampled sequences they
    came from. Attach both with ``with_provenance``.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    routed_experts_ref: Any = None  # sent by the published client; unused here
    model_input_spans: list[ProvenanceSpan] | None = None
    loss_fn_input_spans: list[ProvenanceSpan] | None = None

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: to_tensor_data(k, x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _check_spans(self) -> "Datum":
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("Datum provenance comes as a pair: set model_input_spans and loss_fn_input_spans "
                             "together (Datum.with_provenance does)")
        return self

    @model_serializer(mode="wrap")
    def _ser(self, handler: Any) -> dict[str, Any]:
        # A datum without provenance keeps the wire shape it always had.
        out = handler(self)
        if self.model_input_spans is None:
            out.pop("model_input_spans", None)
            out.pop("loss_fn_input_spans", None)
        return out

    def with_provenance(self, model_input: list[Any], loss_fn_inputs: list[Any]) -> "Datum":
        """A copy carrying provenance: ``model_input`` spans tile the input tokens,
        ``loss_fn_inputs`` spans tile ``target_tokens``. Miscounted spans fail here."""
        _check_tiling("model_input", model_input, self.model_input.length)
        target = self.loss_fn_inputs.get("target_tokens")
        if target is not None and target.shape and len(target.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, target.shape[0])
        return type(self).model_validate({**dict(self), "model_input_spans": list(model_input),
                                     "loss_fn_input_spans": list(loss_fn_inputs)})


def _check_tiling(name: str, spans: list[Any], length: int) -> None:
    total = sum(getattr(s, "length", 0) for s in spans)
    if total != length:
        raise ValueError(f"with_provenance: the {name} spans cover {total} positions but the field has "
                         f"{length}; the runs must tile it exactly")
