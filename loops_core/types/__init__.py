"""The data types users build and receive, as pydantic v2 models.

Two bases, split by direction:

* ``Request`` types (what a user builds: ``Datum``, ``SamplingParams``, ``AdamParams``, ...) forbid
  unknown fields, so a typo such as ``SamplingParams(max_token=16)`` fails at once.
* ``Response`` types (what a server sends back) ignore unknown fields, so an old client survives a
  newer server.

``TensorData`` is a flat list plus a dtype and a shape. It checks that the data fits the shape and
the dtype, and converts to and from numpy and torch (torch is imported only when asked for). A 2-D
tensor may travel in sparse CSR form (Tinker's ``sparse_crow_indices`` / ``sparse_col_indices``);
every reader densifies it with ``to_numpy(pad_value)``, so engines never see the difference.
"""

from __future__ import annotations

from ._base import Request, Response
from .datum import (KEY_DTYPES, Datum, LossFnType, PromptProvenanceSpan, ProvenanceSpan, SampledProvenanceSpan,
                    to_tensor_data)
from .model_input import EncodedTextChunk, ImageChunk, ModelInput, ModelInputChunk
from .params import AdamParams, LoraConfig, SamplingParams, WandbConfig
from .responses import (Checkpoint, CheckpointDownload, CheckpointFile, CheckpointFilesResponse, ForwardBackwardOutput,
                        GetInfoResponse, InitTrainerServerResponse, LoadWeightsResponse, LoraAdapterConfig, ModelData,
                        OptimStepResponse, SampledSequence, SampleResponse, SampleResult, SaveWeightsForSamplerResponse,
                        SaveWeightsResponse, ServerCapabilities, StopReason, SupportedModel)
from .tensor import DType, TensorData  # noqa: F401 (DType is used by annotations downstream)

__all__ = [
    "AdamParams", "Checkpoint", "CheckpointDownload", "CheckpointFile", "CheckpointFilesResponse",
    "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "GetInfoResponse", "ImageChunk",
    "InitTrainerServerResponse", "KEY_DTYPES", "LoadWeightsResponse", "LoraAdapterConfig", "LoraConfig",
    "LossFnType", "ModelData", "ModelInput", "ModelInputChunk", "OptimStepResponse", "PromptProvenanceSpan",
    "ProvenanceSpan", "Request", "SampledProvenanceSpan",
    "Response", "SampleResponse", "SampleResult", "SampledSequence", "SamplingParams",
    "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServerCapabilities", "StopReason",
    "SupportedModel", "TensorData", "WandbConfig", "to_tensor_data",
]
