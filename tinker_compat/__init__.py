"""``tinker``: run Tinker (0.38) scripts unchanged on loops.

``import tinker`` gives Tinker's public surface over loops: the same types where they mean the same
(``tinker.types.Datum is loops_core.Datum``), thin adapters where Tinker differs (clients whose
every method returns an ``APIFuture``, ``tinker://`` paths, Tinker's exception tree, Tinker's
``AdamParams`` defaults). The backend is chosen by ``LOOPS_BACKEND`` (fake, local, modal,
baseten), not by ``base_url``. See the README section "Running Tinker scripts".
"""

from . import types
from ._exceptions import (APIConnectionError, APIError, APIResponseValidationError, APIStatusError, APITimeoutError,
                          AuthenticationError, BadRequestError, BillingError, ConflictError, InternalServerError,
                          NotFoundError, PermissionDeniedError, RateLimitError, RequestFailedError, TinkerError,
                          UnprocessableEntityError)
from .lib.public_interfaces import (APIFuture, BackcompatSamplingClientFuture, BackcompatTrainingClientFuture,
                                    RestClient, SamplingClient, ServiceClient, TrainingClient)
from .types import (AdamOptimizerConfig, AdamParams, Checkpoint, CheckpointType, Datum, DimuonOptimizerConfig,
                    DimuonParams, EncodedTextChunk, ForwardBackwardOutput, ImageChunk, LoraConfig, ModelID,
                    ModelInput, ModelInputChunk, OptimParams, OptimStepResponse, ParsedCheckpointTinkerPath,
                    PromptProvenanceSpan, SampledProvenanceSpan, SampledSequence, SampleResponse, SamplingParams,
                    StopReason, TensorData, TensorDtype, TrainingRun)

__version__ = "0.38.0"  # the Tinker API version this shim follows
__title__ = "tinker (loops shim)"


class ExperimentalWarning(Warning):
    """Warns about alpha features (as in Tinker)."""


__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AdamOptimizerConfig", "AdamParams", "AuthenticationError", "BackcompatSamplingClientFuture",
    "BackcompatTrainingClientFuture", "BadRequestError", "BillingError", "Checkpoint", "CheckpointType",
    "ConflictError", "Datum", "DimuonOptimizerConfig", "DimuonParams", "EncodedTextChunk", "ExperimentalWarning",
    "ForwardBackwardOutput", "ImageChunk", "InternalServerError", "LoraConfig", "ModelID", "ModelInput",
    "ModelInputChunk", "NotFoundError", "OptimParams", "OptimStepResponse", "ParsedCheckpointTinkerPath",
    "PermissionDeniedError", "PromptProvenanceSpan", "RateLimitError", "RequestFailedError", "RestClient",
    "SampleResponse", "SampledProvenanceSpan", "SampledSequence", "SamplingClient", "SamplingParams",
    "ServiceClient", "StopReason", "TensorData", "TensorDtype", "TinkerError", "TrainingClient", "TrainingRun",
    "UnprocessableEntityError", "__title__", "__version__", "types",
]
