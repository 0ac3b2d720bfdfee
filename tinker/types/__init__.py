"""Tinker's public data types (`tinker.types`)."""

from .checkpoints import (
    AuditLogEntry,
    AuditLogResponse,
    Checkpoint,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    CheckpointType,
    Cursor,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    ParsedCheckpointTinkerPath,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
    WhoamiResponse,
)
from .custom_loss import CustomLossInput, CustomLossInputRank
from .datum import (
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LossFnInputs,
    LossFnOutput,
    LossFnType,
)
from .model_input import (
    DmelChunk,
    EncodedTextChunk,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInput,
    ModelInputChunk,
)
from .params import (
    AdamOptimizerConfig,
    AdamParams,
    DimuonOptimizerConfig,
    DimuonParams,
    LoraConfig,
    OptimizerConfig,
    OptimizerConfigBase,
    OptimParams,
    OptimParamsBase,
    OptimStepRequest,
    SampleRequest,
    SamplingParams,
    StopReason,
)
from .provenance import PromptProvenanceSpan, ProvenanceSpans, SampledProvenanceSpan
from .responses import (
    ExternalWeightsUrlsResponse,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    ModelData,
    ModelID,
    OptimStepResponse,
    PromptAltTokens,
    RequestErrorCategory,
    SampledSequence,
    SampleResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsExternalResponse,
    SaveWeightsResponse,
    SupportedModel,
    TopkLogprobs,
    TopkPromptLogprobs,
)
from .service import (
    AccessibleSearchOwner,
    ActiveSessionStatusQuery,
    BillingEventInfo,
    BillingUsageEvent,
    BillingUsageResponse,
    BillingUsageSession,
    CancelledSessionStatusQuery,
    CheckpointBillingEvent,
    ClientFinishedSessionStatusQuery,
    ClientSessionFinished,
    CopyWeightsResponse,
    CurrentCheckpointStorageUsageItem,
    CurrentCheckpointStorageUsageResponse,
    FailedSessionStatusQuery,
    OwnSearchOwner,
    SamplingClientKind,
    SamplingPrefillBillingEvent,
    SamplingSampleBillingEvent,
    SearchOwner,
    SessionActive,
    SessionCancelled,
    SessionFailed,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionStatus,
    SessionStatusQuery,
    SessionSummary,
    StorageBillingEvent,
    TrainingBillingEvent,
    UserSearchOwner,
)
from .tensor_data import TensorData, TensorDtype

__all__ = [
    # inputs
    "ModelInput", "ModelInputChunk", "EncodedTextChunk", "ImageChunk", "ImageAssetPointerChunk", "DmelChunk",
    "TensorData", "TensorDtype", "Datum", "LossFnInputs", "LossFnOutput", "LossFnType", "ForwardBackwardInput",
    # parameters and requests
    "AdamParams", "LoraConfig", "SamplingParams", "StopReason", "OptimStepRequest", "SampleRequest",
    # responses
    "ForwardBackwardOutput", "OptimStepResponse", "SaveWeightsResponse", "SaveWeightsForSamplerResponse",
    "LoadWeightsResponse", "GetInfoResponse", "ModelData", "ModelID", "GetServerCapabilitiesResponse",
    "SupportedModel", "SampleResponse", "SampledSequence", "TopkPromptLogprobs", "RequestErrorCategory",
    # checkpoints and REST
    "Checkpoint", "CheckpointType", "ParsedCheckpointTinkerPath", "TrainingRun", "Cursor", "TrainingRunsResponse",
    "CheckpointsListResponse", "CheckpointArchiveUrlResponse", "WeightsInfoResponse", "GetSessionResponse",
    "ListSessionsResponse", "GetSamplerResponse", "WhoamiResponse", "AuditLogEntry", "AuditLogResponse",
    # service: sampler kinds, copies, session search, billing and storage usage
    "SamplingClientKind", "CopyWeightsResponse", "SessionSearchRequest", "SessionSearchResponse", "SessionSummary",
    "SessionSearchCursor", "SearchOwner", "OwnSearchOwner", "AccessibleSearchOwner", "UserSearchOwner",
    "SessionStatusQuery", "ActiveSessionStatusQuery", "CancelledSessionStatusQuery", "FailedSessionStatusQuery",
    "ClientFinishedSessionStatusQuery", "SessionStatus", "SessionActive", "SessionCancelled", "SessionFailed",
    "ClientSessionFinished", "BillingUsageResponse", "BillingUsageEvent", "BillingUsageSession", "BillingEventInfo",
    "TrainingBillingEvent", "SamplingPrefillBillingEvent", "SamplingSampleBillingEvent", "CheckpointBillingEvent",
    "StorageBillingEvent", "CurrentCheckpointStorageUsageResponse", "CurrentCheckpointStorageUsageItem",
    # 0.30-0.38: optimizers, provenance, custom losses, sampling extras, external weights
    "OptimizerConfig", "OptimizerConfigBase", "AdamOptimizerConfig", "DimuonOptimizerConfig", "OptimParams",
    "OptimParamsBase", "DimuonParams", "PromptProvenanceSpan", "SampledProvenanceSpan", "ProvenanceSpans",
    "CustomLossInput", "CustomLossInputRank", "PromptAltTokens", "TopkLogprobs",
    "SaveWeightsExternalResponse", "ExternalWeightsUrlsResponse",
]  # fmt: skip
