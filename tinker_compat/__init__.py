"""``tinker``: run Tinker (0.38) scripts unchanged on loops.

``import tinker`` gives Tinker's public surface, type for type (``tinker.types``: frozen dataclasses
and frozen pydantic models as in tinker 0.38), over loops' clients. The shim converts Tinker's
types to loops' when a call goes out and loops' results back to Tinker's, in one place
(``tinker._convert``), and raises Tinker's exceptions with Tinker's constructors. The backend is
chosen by ``LOOPS_BACKEND`` (fake, local, modal, baseten), not by ``base_url``.
``tests/test_tinker_surface.py`` compares this surface with the real SDK's; see the README section
"Running Tinker scripts" for what is not supported.
"""

from typing_extensions import TypedDict as _TypedDict

import httpx as _httpx

from . import auth, lib, proto, resources, types
from ._exceptions import (APIConnectionError, APIError, APIResponseValidationError, APIStatusError, APITimeoutError,
                          AuthenticationError, BadRequestError, BillingError, ConflictError, InternalServerError,
                          NotFoundError, PermissionDeniedError, RateLimitError, RequestFailedError, TinkerError,
                          UnprocessableEntityError)
from .lib.public_interfaces import (AdminClient, APIFuture, BackcompatSamplingClientFuture,
                                    BackcompatTrainingClientFuture, LossHandle, PerDatumLossFn, RestClient,
                                    SamplingClient, ServiceClient, TrainingClient)
from .types import (AdamOptimizerConfig, AdamParams, Checkpoint, CheckpointType, Datum, DimuonOptimizerConfig,
                    DimuonParams, DmelChunk, EncodedTextChunk, ForwardBackwardOutput, LoraConfig, ModelID, ModelInput,
                    ModelInputChunk, OptimParams, OptimStepRequest, OptimStepResponse, ParsedCheckpointTinkerPath,
                    PromptProvenanceSpan, SampledProvenanceSpan, SampledSequence, SampleRequest, SampleResponse,
                    SamplingParams, StopReason, TensorData, TensorDtype, TrainingRun)

__version__ = "0.38.0"  # the Tinker API version this shim follows
__title__ = "tinker"

Timeout = _httpx.Timeout  # accepted for signature compatibility; loops' wire client has its own timeouts


class RequestOptions(_TypedDict, total=False):
    """Per-request options of Tinker's HTTP client; loops' clients ignore them."""

    headers: dict[str, str]
    max_retries: int
    timeout: "float | _httpx.Timeout | None"
    params: dict[str, object]
    extra_json: dict[str, object]
    idempotency_key: str
    follow_redirects: bool


class ExperimentalWarning(FutureWarning):
    """Warns about alpha features (as in Tinker)."""


__all__ = [
    "TrainingClient", "BackcompatTrainingClientFuture", "ServiceClient", "SamplingClient",
    "BackcompatSamplingClientFuture", "RestClient", "AdminClient", "APIFuture", "LossHandle", "PerDatumLossFn",
    "auth", "AdamOptimizerConfig", "AdamParams", "DimuonOptimizerConfig", "DimuonParams", "OptimParams",
    "Checkpoint", "CheckpointType", "Datum", "DmelChunk", "EncodedTextChunk", "ForwardBackwardOutput",
    "SampledProvenanceSpan", "LoraConfig", "ModelID", "ModelInput", "ModelInputChunk", "OptimStepRequest",
    "OptimStepResponse", "ParsedCheckpointTinkerPath", "PromptProvenanceSpan", "SampledSequence", "SampleRequest",
    "SampleResponse", "SamplingParams", "StopReason", "TensorData", "TensorDtype", "TrainingRun", "Timeout",
    "RequestOptions", "TinkerError", "APIError", "APIStatusError", "APITimeoutError", "APIConnectionError",
    "APIResponseValidationError", "RequestFailedError", "BadRequestError", "AuthenticationError", "BillingError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "UnprocessableEntityError", "RateLimitError",
    "InternalServerError", "ExperimentalWarning", "types", "__version__", "__title__",
]
