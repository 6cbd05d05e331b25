"""``Datum`` and provenance spans: frozen dataclasses, as in Tinker (``dataclasses.replace`` works)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ._model_input import ModelInput
from ._tensor_data import TensorData

__all__ = ["Datum", "LossFnInputs", "LossFnOutput", "PromptProvenanceSpan", "ProvenanceSpans",
           "SampledProvenanceSpan"]

LossFnInputs = Dict[str, TensorData]
LossFnOutput = Dict[str, TensorData]
# dtype of a plain Python list per loss input (a list carries no dtype of its own)
_LIST_DTYPES = {"target_tokens": "int64"}
_SPARSE_KEYS = {"target_tokens", "weights"}


def _check_span(span: Any) -> None:
    name = type(span).__name__
    if span.length < 0:
        raise ValueError(f"{name}.length must be >= 0, got {span.length}")
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must be non-empty")
    if span.offset < 0:
        raise ValueError(f"{name}.offset must be >= 0, got {span.offset}")


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """These datum positions are positions ``[offset, offset + length)`` of a sequence's request prompt."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """These datum positions are positions ``[offset, offset + length)`` of a sequence's sampled tokens."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


ProvenanceSpans = List[Union[PromptProvenanceSpan, SampledProvenanceSpan]]


@dataclass(frozen=True)
class Datum:
    model_input: ModelInput
    loss_fn_inputs: LossFnInputs = field(default_factory=dict)
    model_input_spans: Optional[ProvenanceSpans] = None  # runs tiling model_input (see with_provenance)
    loss_fn_input_spans: Optional[ProvenanceSpans] = None  # runs tiling loss_fn_inputs["target_tokens"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_fn_inputs",
                           {key: _to_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()})
        for name in ("model_input_spans", "loss_fn_input_spans"):
            for span in getattr(self, name) or ():
                if not isinstance(span, (PromptProvenanceSpan, SampledProvenanceSpan)):
                    raise TypeError(f"{name} entries must be PromptProvenanceSpan or SampledProvenanceSpan, got "
                                    f"{type(span).__name__}")
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise AssertionError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> Datum:
        """A copy carrying provenance; each span list must tile its field exactly."""
        _check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return replace(self, model_input_spans=model_input, loss_fn_input_spans=loss_fn_inputs)


def _check_tiling(kwarg: str, spans: ProvenanceSpans, expected: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(f"with_provenance {kwarg} spans cover {total} positions but the field has {expected}; "
                         "the runs must tile it exactly")


def _to_tensor_data(key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        return TensorData.from_torch_sparse(value) if key in _SPARSE_KEYS and value.ndim == 2 else \
            TensorData.from_torch(value)
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise ValueError(f"{key} must be a rectangular numeric array; ragged nested lists are not supported") \
                from exc
        if array.dtype.kind not in "fiub":
            raise ValueError(f"{key} must be a rectangular numeric array; got {array.dtype} values")
        dtype = _LIST_DTYPES.get(key, "float32")
        return TensorData(data=array, dtype=dtype, shape=list(array.shape))
    raise TypeError(f"Unsupported loss_fn_inputs value for {key!r}: {type(value).__name__}")
