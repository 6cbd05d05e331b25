"""What servers send back (unknown fields are ignored)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import Response
from .tensor import TensorData


class ForwardBackwardOutput(Response):
    """Result of forward / forward_backward.

    ``loss_fn_outputs`` has one dict per datum (``logprobs``: the trainer's logprob of each target,
    NaN where the target is masked). ``metrics`` keys are ``name:reduction`` (``loss:sum``, ...).
    """

    loss: float = 0.0
    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(Response):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(Response):
    mode: str = "full"
    path: str


class SaveWeightsForSamplerResponse(Response):
    version: int = 0
    path: str


class LoadWeightsResponse(Response):
    step: int = 0
    path: str | None = None


class InitTrainerServerResponse(Response):
    step: int = 0
    lora_rank: int


StopReason = Literal["stop", "length"]


class SampledSequence(Response):
    tokens: list[int]
    logprobs: list[float] | None = None
    stop_reason: StopReason = "length"
    text: str | None = None
    sequence_id: str | None = None
    # With topk_sample_logprobs=k: per sampled token, the k most likely (token id, logprob).
    topk_logprobs: list[list[tuple[int, float]]] | None = None


class SampleResponse(Response):
    """Result of ``sample``; ``policy_version`` is the adapter version the sampler served."""

    sequences: list[SampledSequence]
    policy_version: int | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    # With target_prompt_logprobs: the logprob of each requested id, [len(prompt) - 1, K], 0.0 for -1.
    target_prompt_logprobs: list[list[float]] | None = None
    # Prompt tokens the sampler did not recompute (a prefix-cache hit); 0 when nothing was cached.
    prompt_cache_hit_tokens: int = 0


SampleResult = SampleResponse


class LoraAdapterConfig(Response):
    r: int


class Checkpoint(Response):
    """A saved checkpoint (``checkpoint_id`` is the name it was saved under)."""

    id: str
    run_id: str
    checkpoint_id: str
    checkpoint_type: str
    created_at: str
    base_model: str | None = None
    lora_adapter_config: LoraAdapterConfig | None = None
    size_bytes: int | None = None
    sync_status: str | None = None
    target: str | None = None  # "sampler" | "trainer"
    path: str | None = None


class CheckpointFile(Response):
    url: str
    relative_file_name: str
    node_rank: int = 0
    size_bytes: int
    last_modified: str | None = None


class CheckpointFilesResponse(Response):
    presigned_urls: list[CheckpointFile]
    next_page_token: int | None = None
    total_count: int = 0


class CheckpointDownload(Response):
    dest_dir: str
    file_count: int
    bytes_written: int


class SupportedModel(Response):
    model_name: str
    max_context_length: int | None = None
    gpu_classes: list[str] = Field(default_factory=list)


class ServerCapabilities(Response):
    supported_models: list[SupportedModel]


class ModelData(Response):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(Response):
    model_data: ModelData
    model_name: str
    is_lora: bool = True
    lora_rank: int
    max_seq_len: int | None = None
