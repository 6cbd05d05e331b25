"""``tinker.types``: Tinker's type names over loops' types.

Where a Tinker type means what a loops type means, the name below *is* the loops class (``Datum``,
``TensorData``, ``ModelInput``, ``SamplingParams``, ``SampleResponse``, ...): ``isinstance`` and
pickling behave the same from either import. Where Tinker differs, the shim has its own class:

* ``AdamParams`` subclasses ``loops_core.AdamParams`` with Tinker's default ``grad_clip_norm=0.0``
  (no clipping; loops' own default is 1.0). It *is* a loops ``AdamParams``, so every loops API
  takes it; a plain ``loops_core.AdamParams`` passed to the shim keeps its own defaults.
* ``LoraConfig`` likewise, with Tinker's default ``train_unembed=True``.
* ``Checkpoint``, ``TrainingRun``, ``CheckpointsListResponse``, ``WeightsInfoResponse``,
  ``ParsedCheckpointTinkerPath``, ``ExternalWeightsUrlsResponse`` have Tinker's shapes
  (``checkpoint_id`` is ``"<weights|sampler_weights>/<name>"``, paths are ``tinker://...``); the
  shim builds them from loops' checkpoint records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Union

from pydantic import Field

import loops_core.types as _lt
from loops_core.types import (Datum, EncodedTextChunk, ForwardBackwardOutput, GetInfoResponse, ImageChunk,
                              LoadWeightsResponse, LossFnType, ModelData, ModelInput, ModelInputChunk,
                              OptimStepResponse, PromptProvenanceSpan, ProvenanceSpan, SampledProvenanceSpan,
                              SampledSequence, SampleResponse, SamplingParams, SaveWeightsForSamplerResponse,
                              SaveWeightsResponse, StopReason, SupportedModel, TensorData)
from loops_core.types import ServerCapabilities as GetServerCapabilitiesResponse

ModelID = str
TensorDtype = Literal["int64", "float32"]
CheckpointType = Literal["training", "sampler", "external"]
SamplingClientKind = Literal["snapshot", "inflight"]
RequestErrorCategory = Literal["unknown", "server", "user"]
ProvenanceSpans = list[ProvenanceSpan]


class AdamParams(_lt.AdamParams):
    """Adam(W) hyperparameters with Tinker's defaults: ``grad_clip_norm=0.0`` means no clipping."""

    grad_clip_norm: float = Field(default=0.0, ge=0)


class DimuonParams(_lt.Request):
    """Accepted as a type; loops trainers run Adam only, so ``optim_step`` rejects it."""

    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)
    beta1: float = 0.9


OptimParams = Union[AdamParams, DimuonParams]


class AdamOptimizerConfig(_lt.Request):
    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(_lt.Request):
    type: Literal["dimuon"] = "dimuon"
    version: int = 1


OptimizerConfig = Union[AdamOptimizerConfig, DimuonOptimizerConfig]


class LoraConfig(_lt.LoraConfig):
    """Tinker's LoRA settings (``train_unembed`` defaults to True as in Tinker)."""

    train_unembed: bool = True


class Checkpoint(_lt.Response):
    checkpoint_id: str  # "<weights|sampler_weights>/<name>", the path component REST calls take
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class ParsedCheckpointTinkerPath(_lt.Response):
    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> "ParsedCheckpointTinkerPath":
        """``tinker://<run>/<weights|sampler_weights|external_weights>/<name>`` split into its parts."""
        kinds = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
        parts = tinker_path[len("tinker://"):].split("/") if tinker_path.startswith("tinker://") else []
        if len(parts) != 3 or parts[1] not in kinds or not parts[0] or not parts[2]:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(tinker_path=tinker_path, training_run_id=parts[0], checkpoint_type=kinds[parts[1]],
                   checkpoint_id=f"{parts[1]}/{parts[2]}")


class CheckpointsListResponse(_lt.Response):
    checkpoints: list[Checkpoint]
    cursor: dict | None = None


class TrainingRun(_lt.Response):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(_lt.Response):
    training_runs: list[TrainingRun]
    cursor: dict | None = None


class WeightsInfoResponse(_lt.Response):
    base_model: str
    optimizer_config: AdamOptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class ExternalWeightsUrlsResponse(_lt.Response):
    urls: dict[str, str]
    expires: datetime | None = None


class SaveWeightsExternalResponse(_lt.Response):
    path: str


__all__ = [
    "AdamOptimizerConfig", "AdamParams", "Checkpoint", "CheckpointType", "CheckpointsListResponse", "Datum",
    "DimuonOptimizerConfig", "DimuonParams", "EncodedTextChunk", "ExternalWeightsUrlsResponse",
    "ForwardBackwardOutput", "GetInfoResponse", "GetServerCapabilitiesResponse", "ImageChunk",
    "LoadWeightsResponse", "LoraConfig", "LossFnType", "ModelData", "ModelID", "ModelInput", "ModelInputChunk",
    "OptimParams", "OptimStepResponse", "OptimizerConfig", "ParsedCheckpointTinkerPath", "PromptProvenanceSpan",
    "ProvenanceSpans", "RequestErrorCategory", "SampleResponse", "SampledProvenanceSpan", "SampledSequence",
    "SamplingClientKind", "SamplingParams", "SaveWeightsExternalResponse", "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse", "StopReason", "SupportedModel", "TensorData", "TensorDtype", "TrainingRun",
    "TrainingRunsResponse", "WeightsInfoResponse",
]
