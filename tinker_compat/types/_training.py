"""Training request/response dataclasses and the small names around them, as in Tinker."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Dict, List, Literal, Mapping, Optional, Union

from ._datum import Datum, LossFnOutput

__all__ = ["CheckpointType", "ForwardBackwardInput", "ForwardBackwardOutput", "ForwardBackwardRequest",
           "ForwardRequest", "LossFnType", "ModelID", "RequestErrorCategory", "RequestID", "SamplingClientKind"]

ModelID = str
RequestID = str
CheckpointType = Literal["training", "sampler", "external"]
SamplingClientKind = Literal["snapshot", "inflight"]
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                     "custom"]


class RequestErrorCategory(StrEnum):
    Unknown = auto()
    Server = auto()
    User = auto()


@dataclass(frozen=True)
class ForwardBackwardInput:
    data: List[Datum]
    loss_fn: LossFnType
    loss_fn_config: Optional[Mapping[str, Union[float, str]]] = field(default=None)


@dataclass(frozen=True)
class ForwardBackwardOutput:
    loss_fn_output_type: str
    loss_fn_outputs: List[LossFnOutput]  # per datum, e.g. {"logprobs": TensorData}
    metrics: Dict[str, float] = field(default_factory=dict)  # "name:reduction" keys, e.g. "loss:sum"


@dataclass(frozen=True)
class ForwardBackwardRequest:
    forward_backward_input: ForwardBackwardInput
    model_id: ModelID
    seq_id: Optional[int] = None


@dataclass(frozen=True)
class ForwardRequest:
    forward_input: ForwardBackwardInput
    model_id: ModelID
    seq_id: Optional[int] = None
