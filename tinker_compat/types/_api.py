"""The data types of Tinker's service API: requests and responses of its HTTP endpoints, sessions,
futures, checkpoints and runs, telemetry, billing and audit logs. Frozen pydantic models, field for
field as in tinker 0.38 (``tests/test_tinker_surface.py`` checks it).

The shim builds the ones its clients return (``Checkpoint``, ``TrainingRun``, ``GetInfoResponse``,
``Save*Response``, ...). The rest describe parts of Tinker's service that loops does not run
(billing, audit logs, telemetry, session search, the HTTP wire format itself): they import and
construct, and nothing in loops produces or consumes them; the client methods that would return
them raise ``NotImplementedError`` naming the reason (see the README's tinker section).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Union

from pydantic import AwareDatetime, Field

from ._base import BaseModel, StrictBase
from ._model_input import ModelInput
from ._optimizer import AdamOptimizerConfig, AdamParams, OptimizerConfigBase, OptimParamsBase
from ._sample_response import SamplingParams
from ._tensor_data import TensorData
from ._training import ForwardBackwardOutput, RequestErrorCategory


class AccessibleSearchOwner(StrictBase):
    type: Literal['accessible'] = 'accessible'


class ActiveSessionStatusQuery(StrictBase):
    type: Literal['active'] = 'active'


class AuditLogEntry(BaseModel):
    event: str
    timestamp: datetime
    event_details: dict[str, object] = Field(default_factory=dict)
    model_id: Union[None, str] = None
    purpose: Union[None, str] = None
    tinker_path: Union[None, str] = None


class AuditLogResponse(BaseModel):
    entries: list[AuditLogEntry]


class AuthTokenResponse(BaseModel):
    jwt: str


class BillingUsageEvent(BaseModel):
    bucket_end: datetime
    bucket_start: datetime
    event_info: Union[CheckpointBillingEvent, SamplingPrefillBillingEvent, SamplingSampleBillingEvent, StorageBillingEvent, TrainingBillingEvent]
    base_model: Union[None, str] = None
    effective_rate_usd_per_gigabyte_month: Union[None, float] = None
    effective_rate_usd_per_million_tokens: Union[None, float] = None
    estimated_cost_usd: Union[None, float] = None
    project_id: Union[None, str] = None
    session_id: Union[None, str] = None
    user_id: Union[None, str] = None
    user_name: Union[None, str] = None


class BillingUsageResponse(BaseModel):
    data: list[BillingUsageEvent]
    cost_data_through: Union[None, datetime] = None
    sessions: dict[str, BillingUsageSession] = Field(default_factory=dict)


class BillingUsageSession(BaseModel):
    user_metadata: Union[None, dict[str, str]] = None


class CancelledSessionStatusQuery(StrictBase):
    type: Literal['cancelled'] = 'cancelled'


class Checkpoint(BaseModel):
    checkpoint_id: str
    checkpoint_type: Literal['external', 'sampler', 'training']
    time: datetime
    tinker_path: str
    expires_at: Union[None, datetime] = None
    public: bool = False
    size_bytes: Union[None, int] = None
    user_metadata: Union[None, dict[str, str]] = None


class CheckpointBillingEvent(BaseModel):
    count: int
    type: Literal['checkpoint'] = 'checkpoint'


class CheckpointsListResponse(BaseModel):
    checkpoints: list[Checkpoint]
    cursor: Union[Cursor, None] = None


class ClientConfigRequest(StrictBase):
    sdk_version: str


class ClientConfigResponse(BaseModel):
    billing_exception_max_pause_duration_sec: int = 3600
    credential_default_source: str = 'api_key'
    custom_loss_server_side: bool = False
    fwdbwd_dispatch_bytes_semaphore_size: int = 50000000
    fwdbwd_max_chunk_bytes_count: int = 5000000
    fwdbwd_max_chunk_len: int = 1024
    inflight_response_bytes_semaphore_size: int = 52428800
    parallel_fwdbwd_chunks: bool = True
    pjwt_auth_enabled: bool = False
    proto_compress_fwdbwd: bool = False
    sample_dispatch_bytes_semaphore_size: int = 10485760
    sample_enable_stuck_detection: bool = True
    sample_join_sampling_session: bool = False
    sample_max_concurrent_requests: int = 2000
    sample_no_retries: bool = False
    sample_use_retrieve_futures: bool = False
    use_pyqwest_transport: bool = True


class ClientDynamicConfigResponse(BaseModel):
    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False
    sample_cancel_max_batch_size: int = 64


class ClientFinishedSessionStatusQuery(StrictBase):
    reasons: Union[None, list[Literal['errored', 'interrupted', 'success']]] = None
    type: Literal['client_finished'] = 'client_finished'


class ClientSessionFinishErrored(BaseModel):
    type: Literal['errored'] = 'errored'


class ClientSessionFinishInterrupted(BaseModel):
    type: Literal['interrupted'] = 'interrupted'


class ClientSessionFinishSuccess(BaseModel):
    type: Literal['success'] = 'success'


class ClientSessionFinished(BaseModel):
    reason: Union[ClientSessionFinishErrored, ClientSessionFinishInterrupted, ClientSessionFinishSuccess]
    detail: Union[None, str] = None
    type: Literal['client_finished'] = 'client_finished'


class CopyWeightsRequest(StrictBase):
    source_path: str
    destination_project_id: Union[None, str] = None
    model_seq_id: Union[None, int] = None
    session_id: Union[None, str] = None
    ttl_seconds: Union[None, int] = None
    weights_access_token: Union[None, str] = None


class CopyWeightsResponse(BaseModel):
    tinker_path: str


class CreateCustomLossRequest(StrictBase):
    custom_loss_seq_id: int
    graph: CustomLossGraph
    inputs: list[CustomLossInput]
    name: str
    session_id: str
    type: Literal['create_custom_loss'] = 'create_custom_loss'


class CreateCustomLossResponse(BaseModel):
    loss_id: str
    type: Literal['create_custom_loss'] = 'create_custom_loss'


class CreateModelRequest(StrictBase):
    base_model: str
    model_seq_id: int
    session_id: str
    lora_config: Union[LoraConfig, None] = None
    optimizer_config: Union[AdamOptimizerConfig, OptimizerConfigBase] = Field(default_factory=lambda: AdamOptimizerConfig(type='adamw'))
    type: Literal['create_model'] = 'create_model'
    user_metadata: Union[None, dict[str, Any]] = None


class CreateModelResponse(BaseModel):
    model_id: str
    type: Literal['create_model'] = 'create_model'


class CreateSamplingSessionRequest(StrictBase):
    sampling_session_seq_id: int
    session_id: str
    base_model: Union[None, str] = None
    model_path: Union[None, str] = None
    type: Literal['create_sampling_session'] = 'create_sampling_session'


class CreateSamplingSessionResponse(BaseModel):
    sampling_session_id: str
    type: Literal['create_sampling_session'] = 'create_sampling_session'


class CreateSessionRequest(StrictBase):
    sdk_version: str
    tags: list[str]
    user_metadata: Union[None, dict[str, Any]]
    display_name: Union[None, str] = None
    project_id: Union[None, str] = None
    type: Literal['create_session'] = 'create_session'


class CreateSessionResponse(BaseModel):
    session_id: str
    error_message: Union[None, str] = None
    info_message: Union[None, str] = None
    type: Literal['create_session'] = 'create_session'
    warning_message: Union[None, str] = None


class CurrentCheckpointStorageUsageItem(BaseModel):
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: Union[None, float] = None
    org_user_urn: Union[None, str] = None
    project_id: Union[None, str] = None
    user_email: Union[None, str] = None
    user_name: Union[None, str] = None


class CurrentCheckpointStorageUsageResponse(BaseModel):
    data: list[CurrentCheckpointStorageUsageItem]
    effective_rate_usd_per_gigabyte_month: Union[None, float] = None


class Cursor(BaseModel):
    limit: int
    offset: int
    total_count: int


class CustomLossGraph(StrictBase):
    nodes: list[CustomLossNode]
    format: Literal[1] = 1


class CustomLossInput(StrictBase):
    name: str
    rank: Literal[0, 1, 2]


class CustomLossNode(StrictBase):
    name: str
    op: Literal['call_function', 'call_method', 'call_module', 'get_attr', 'output', 'placeholder']
    target: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ExternalWeightsUrlsResponse(BaseModel):
    expires: datetime
    urls: dict[str, str]


class FailedSessionStatusQuery(StrictBase):
    type: Literal['failed'] = 'failed'


class FutureFailed(BaseModel):
    request_id: str
    state: Literal['failed'] = 'failed'


class FutureFinished(BaseModel):
    request_id: str
    response_payload_uncompressed_size: Union[None, int] = None
    state: Literal['finished'] = 'finished'


class FutureRetrieveRequest(StrictBase):
    request_id: str
    allow_metadata_only: bool = False


class FuturesRetrieveRequest(StrictBase):
    target: SamplingSessionFuturesTarget
    prev_cursor: int = 0
    retrieved_request_ids: list[str] = Field(default_factory=list)
    timeout: Union[None, float] = None


class FuturesRetrieveResponse(BaseModel):
    completions: list[Union[FutureFailed, FutureFinished]]
    cursor: int


class GetBillingUsageRequest(StrictBase):
    ending_before: datetime
    starting_on: datetime


class GetCurrentCheckpointStorageUsageRequest(StrictBase):
    project_id: Union[None, str] = None


class GetInfoRequest(StrictBase):
    model_id: str
    type: Literal['get_info'] = 'get_info'


class GetInfoResponse(BaseModel):
    model_data: ModelData
    model_id: str
    is_lora: Union[None, bool] = None
    lora_rank: Union[None, int] = None
    model_name: Union[None, str] = None
    optimizer_config: Union[AdamOptimizerConfig, OptimizerConfigBase] = Field(default_factory=lambda: AdamOptimizerConfig(type='adamw'))
    type: Union[Literal['get_info'], None] = None


class GetSamplerResponse(BaseModel):
    base_model: str
    sampler_id: str
    model_path: Union[None, str] = None


class GetServerCapabilitiesResponse(BaseModel):
    supported_models: list[SupportedModel]


class GetSessionResponse(BaseModel):
    sampler_ids: list[str]
    training_run_ids: list[str]
    display_name: Union[None, str] = None
    user_metadata: Union[None, dict[str, str]] = None


class HealthResponse(BaseModel):
    status: Literal['ok']


class JoinSamplingSessionRequest(StrictBase):
    sampling_session_id: str
    type: Literal['join_sampling_session'] = 'join_sampling_session'


class JoinSamplingSessionResponse(BaseModel):
    client_counter: int
    type: Literal['join_sampling_session'] = 'join_sampling_session'


class ListSessionsResponse(BaseModel):
    sessions: list[str]


class LoadWeightsRequest(StrictBase):
    optimizer: bool
    path: str
    base_model: Union[None, str] = None
    model_id: Union[None, str] = None
    model_seq_id: Union[None, int] = None
    optimizer_config: Union[AdamOptimizerConfig, None, OptimizerConfigBase] = None
    seq_id: Union[None, int] = None
    session_id: Union[None, str] = None
    type: Literal['load_weights'] = 'load_weights'
    user_metadata: Union[None, dict[str, Any]] = None
    weights_access_token: Union[None, str] = None


class LoadWeightsResponse(BaseModel):
    model_id: Union[None, str] = None
    path: Union[None, str] = None
    type: Union[Literal['load_weights'], None] = None


class LoraConfig(StrictBase):
    rank: int
    seed: Union[None, int] = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


class ModelData(BaseModel):
    arch: Union[None, str] = None
    model_name: Union[None, str] = None
    tokenizer_id: Union[None, str] = None


class OptimStepRequest(StrictBase):
    model_id: str
    optim_params: Union[AdamParams, OptimParamsBase]
    seq_id: Union[None, int] = None
    type: Literal['optim_step'] = 'optim_step'


class OptimStepResponse(BaseModel):
    metrics: Union[None, dict[str, float]] = None


class OwnSearchOwner(StrictBase):
    type: Literal['own'] = 'own'


class ParsedCheckpointTinkerPath(BaseModel):
    checkpoint_id: str
    checkpoint_type: Literal['external', 'sampler', 'training']
    tinker_path: str
    training_run_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """``tinker://<run>/<weights|sampler_weights|external_weights>/<name>`` split into its parts."""
        kinds = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
        parts = tinker_path[len("tinker://"):].split("/") if tinker_path.startswith("tinker://") else []
        if len(parts) != 3 or parts[1] not in kinds:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(tinker_path=tinker_path, training_run_id=parts[0], checkpoint_type=kinds[parts[1]],
                   checkpoint_id="/".join(parts[1:]))


class RequestFailedResponse(BaseModel):
    category: RequestErrorCategory
    error: str


class SampleRequest(StrictBase):
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Union[None, str] = None
    model_path: Union[None, str] = None
    num_samples: int = 1
    prompt_alt_tokens_k: int = 0
    prompt_logprobs: Union[None, bool] = None
    prompt_logprobs_last_n: Union[None, int] = None
    record_stability_info: Union[None, bool] = None
    sampling_session_id: Union[None, str] = None
    seq_id: Union[None, int] = None
    target_prompt_logprobs: Union[None, TensorData] = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    type: Literal['sample'] = 'sample'


class SamplingPrefillBillingEvent(BaseModel):
    cached: bool
    token_count: int
    type: Literal['sampling_prefill'] = 'sampling_prefill'


class SamplingSampleBillingEvent(BaseModel):
    token_count: int
    type: Literal['sampling_sample'] = 'sampling_sample'


class SamplingSessionFuturesTarget(StrictBase):
    sampling_session_id: str
    cloned_sampler_id: int = 0
    type: Literal['sampling_session'] = 'sampling_session'


class SaveWeightsExternalRequest(StrictBase):
    model_id: str
    path: str
    age_encryption_recipients: Union[None, list[str]] = None
    seq_id: Union[None, int] = None
    ttl_seconds: Union[None, int] = None
    type: Literal['save_weights_external'] = 'save_weights_external'


class SaveWeightsExternalResponse(BaseModel):
    path: str
    type: Union[Literal['save_weights_external'], None] = None


class SaveWeightsExternalResponseInternal(BaseModel):
    path: Union[None, str] = None
    size_bytes: Union[None, int] = None
    type: Union[Literal['save_weights_external'], None] = None


class SaveWeightsForSamplerRequest(StrictBase):
    model_id: str
    kind: Literal['inflight', 'snapshot'] = 'snapshot'
    path: Union[None, str] = None
    sampling_session_seq_id: Union[None, int] = None
    seq_id: Union[None, int] = None
    ttl_seconds: Union[None, int] = None
    type: Literal['save_weights_for_sampler'] = 'save_weights_for_sampler'
    user_metadata: Union[None, dict[str, str]] = None


class SaveWeightsForSamplerResponse(BaseModel):
    path: str
    type: Union[Literal['save_weights_for_sampler'], None] = None

    def get_console_url(self) -> str:
        """loops has no web console: the checkpoint's own ``tinker://`` path stands in for its page."""
        return self.path

    def get_playground_url(self) -> str:
        """loops has no playground: the checkpoint's own ``tinker://`` path stands in for it."""
        return self.path


class SaveWeightsForSamplerResponseInternal(BaseModel):
    path: Union[None, str] = None
    sampling_session_id: Union[None, str] = None
    type: Union[Literal['save_weights_for_sampler'], None] = None


class SaveWeightsRequest(StrictBase):
    model_id: str
    overwrite: bool = False
    path: Union[None, str] = None
    seq_id: Union[None, int] = None
    ttl_seconds: Union[None, int] = None
    type: Literal['save_weights'] = 'save_weights'
    user_metadata: Union[None, dict[str, str]] = None


class SaveWeightsResponse(BaseModel):
    path: str
    type: Union[Literal['save_weights'], None] = None

    def get_console_url(self) -> str:
        """loops has no web console: the checkpoint's own ``tinker://`` path stands in for its page."""
        return self.path


class SessionActive(BaseModel):
    type: Literal['active'] = 'active'


class SessionCancelled(BaseModel):
    detail: Union[None, str] = None
    type: Literal['cancelled'] = 'cancelled'


class SessionEndEvent(BaseModel):
    duration: str
    event: Literal['GENERIC_EVENT', 'SESSION_END', 'SESSION_START', 'UNHANDLED_EXCEPTION']
    event_id: str
    event_session_index: int
    severity: Literal['CRITICAL', 'DEBUG', 'ERROR', 'INFO', 'WARNING']
    timestamp: datetime


class SessionFailed(BaseModel):
    category: Literal['internal', 'user']
    message: str
    reason: Union[SessionFailedRequestReason, SessionFailedSamplingSessionReason, SessionFailedTrainingRunReason]
    type: Literal['failed'] = 'failed'


class SessionFailedRequestReason(BaseModel):
    request_id: str
    request_type: str
    type: Literal['request'] = 'request'


class SessionFailedSamplingSessionReason(BaseModel):
    sampling_session_id: str
    type: Literal['sampling_session'] = 'sampling_session'


class SessionFailedTrainingRunReason(BaseModel):
    training_run_id: str
    type: Literal['training_run'] = 'training_run'


class SessionHeartbeatRequest(StrictBase):
    session_id: str
    type: Literal['session_heartbeat'] = 'session_heartbeat'


class SessionHeartbeatResponse(BaseModel):
    type: Literal['session_heartbeat'] = 'session_heartbeat'


class SessionSearchCursor(BaseModel):
    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearchRequest(StrictBase):
    cursor: Union[None, SessionSearchCursor] = None
    display_name: Union[None, str] = None
    limit: int = 50
    owner: Union[AccessibleSearchOwner, OwnSearchOwner, UserSearchOwner] = Field(default_factory=lambda: OwnSearchOwner(type='own'))
    project_ids: Union[None, list[str]] = None
    session_id: Union[None, str] = None
    statuses: Union[None, list[Union[ActiveSessionStatusQuery, CancelledSessionStatusQuery, ClientFinishedSessionStatusQuery, FailedSessionStatusQuery]]] = None
    user_metadata: dict[str, str] = Field(default_factory=dict)


class SessionSearchResponse(BaseModel):
    sessions: list[SessionSummary]
    next_cursor: Union[None, SessionSearchCursor] = None


class SessionStartEvent(BaseModel):
    event: Literal['GENERIC_EVENT', 'SESSION_END', 'SESSION_START', 'UNHANDLED_EXCEPTION']
    event_id: str
    event_session_index: int
    severity: Literal['CRITICAL', 'DEBUG', 'ERROR', 'INFO', 'WARNING']
    timestamp: datetime


class SessionSummary(BaseModel):
    checkpoints_count: int
    created_at: datetime
    owner: str
    project_id: str
    session_id: str
    checkpoint_storage_bytes: Union[None, int] = None
    display_name: Union[None, str] = None
    status: Union[None, Union[ClientSessionFinished, SessionActive, SessionCancelled, SessionFailed]] = None
    user_metadata: Union[None, dict[str, str]] = None


class StorageBillingEvent(BaseModel):
    gigabyte_hours: float
    free: bool = False
    type: Literal['storage'] = 'storage'


class SupportedModel(BaseModel):
    max_context_length: Union[None, int] = None
    model_name: Union[None, str] = None
    sampleable: Union[None, bool] = None
    trainable: Union[None, bool] = None


class TelemetryBatch(BaseModel):
    events: list[Union[GenericEvent, SessionEndEvent, SessionStartEvent, UnhandledExceptionEvent]]
    platform: str
    process_uuid: str
    sdk_version: str
    session_id: str


class TelemetryResponse(BaseModel):
    status: Literal['accepted']


class TelemetrySendRequest(StrictBase):
    events: list[Union[GenericEvent, SessionEndEvent, SessionStartEvent, UnhandledExceptionEvent]]
    platform: str
    process_uuid: str
    sdk_version: str
    session_id: str


class TrainingBillingEvent(BaseModel):
    token_count: int
    type: Literal['training'] = 'training'


class TrainingRun(BaseModel):
    base_model: str
    is_lora: bool
    last_request_time: datetime
    model_owner: str
    training_run_id: str
    corrupted: bool = False
    last_checkpoint: Union[Checkpoint, None] = None
    last_sampler_checkpoint: Union[Checkpoint, None] = None
    lora_rank: Union[None, int] = None
    user_metadata: Union[None, dict[str, str]] = None


class TrainingRunsResponse(BaseModel):
    cursor: Cursor
    training_runs: list[TrainingRun]


class UnhandledExceptionEvent(BaseModel):
    error_message: str
    error_type: str
    event: Literal['GENERIC_EVENT', 'SESSION_END', 'SESSION_START', 'UNHANDLED_EXCEPTION']
    event_id: str
    event_session_index: int
    severity: Literal['CRITICAL', 'DEBUG', 'ERROR', 'INFO', 'WARNING']
    timestamp: datetime
    traceback: Union[None, str] = None


class UnloadModelRequest(StrictBase):
    model_id: str
    type: Literal['unload_model'] = 'unload_model'


class UnloadModelResponse(BaseModel):
    model_id: str
    type: Union[Literal['unload_model'], None] = None


class UntypedAPIFuture(BaseModel):
    request_id: str
    model_id: Union[None, str] = None
    sample_sequence_ids: Union[None, list[str]] = None


class UserSearchOwner(StrictBase):
    owner_urns: list[str]
    type: Literal['user'] = 'user'


class WeightsInfoResponse(BaseModel):
    base_model: str
    is_lora: bool
    lora_rank: Union[None, int] = None
    optimizer_config: Union[AdamOptimizerConfig, OptimizerConfigBase] = Field(default_factory=lambda: AdamOptimizerConfig(type='adamw'))
    train_attn: Union[None, bool] = None
    train_mlp: Union[None, bool] = None
    train_unembed: Union[None, bool] = None


class WhoamiResponse(BaseModel):
    org_urn: str
    user_urn: str
    email: Union[None, str] = None


class GenericEvent(BaseModel):
    event: EventType
    event_id: str
    event_name: str
    event_session_index: int
    severity: Severity
    timestamp: datetime
    event_data: dict[str, object] = Field(default_factory=dict)


class TryAgainResponse(BaseModel):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"]


BillingEventInfo = Union[CheckpointBillingEvent, SamplingPrefillBillingEvent, SamplingSampleBillingEvent, StorageBillingEvent, TrainingBillingEvent]
ClientSessionFinishReason = Union[ClientSessionFinishErrored, ClientSessionFinishInterrupted, ClientSessionFinishSuccess]
ClientSessionFinishReasonType = Literal['errored', 'interrupted', 'success']
CustomLossInputRank = Literal[0, 1, 2]
EventType = Literal['GENERIC_EVENT', 'SESSION_END', 'SESSION_START', 'UNHANDLED_EXCEPTION']
FutureCompletion = Union[FutureFailed, FutureFinished]
FutureRetrieveResponse = Union[CreateModelResponse, ForwardBackwardOutput, LoadWeightsResponse, OptimStepResponse, RequestFailedResponse, SaveWeightsExternalResponse, SaveWeightsForSamplerResponse, SaveWeightsResponse, TryAgainResponse, UnloadModelResponse]
SearchOwner = Union[AccessibleSearchOwner, OwnSearchOwner, UserSearchOwner]
SessionFailedReason = Union[SessionFailedRequestReason, SessionFailedSamplingSessionReason, SessionFailedTrainingRunReason]
SessionStatus = Union[ClientSessionFinished, SessionActive, SessionCancelled, SessionFailed]
SessionStatusQuery = Union[ActiveSessionStatusQuery, CancelledSessionStatusQuery, ClientFinishedSessionStatusQuery, FailedSessionStatusQuery]
Severity = Literal['CRITICAL', 'DEBUG', 'ERROR', 'INFO', 'WARNING']
TelemetryEvent = Union[GenericEvent, SessionEndEvent, SessionStartEvent, UnhandledExceptionEvent]


for _model in [v for v in list(globals().values()) if isinstance(v, type) and issubclass(v, BaseModel | StrictBase)]:
    _model.model_rebuild()  # forward references between the models above
