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


# The SDK's one-module-per-type paths, as code imports them (`from tinker.types.sampled_sequence import
# SampledSequence`; the cookbook's `tinker.types.tensor_data`): each is a view of this package's names.
# datum, model_input and tensor_data are modules here too; the SDK's wire-only modules are left out.
_SDK_TYPE_MODULES = (
    "audit_log_entry", "audit_log_response", "billing_usage_response", "checkpoint", "checkpoints_list_response",
    "copy_weights_response", "current_checkpoint_storage_usage_response", "cursor", "custom_loss_input",
    "dmel_chunk", "encoded_text_chunk", "external_weights_urls_response", "forward_backward_input",
    "forward_backward_output", "get_info_response", "get_sampler_response", "get_server_capabilities_response",
    "get_session_response", "image_asset_pointer_chunk", "image_chunk", "list_sessions_response",
    "load_weights_response", "lora_config", "loss_fn_inputs", "loss_fn_output", "loss_fn_type", "model_id",
    "model_input_chunk", "optim_step_request", "optim_step_response", "optimizer", "prompt_alt_tokens",
    "provenance_spans", "request_error_category", "sample_request", "sample_response", "sampled_sequence",
    "sampling_client_kind", "sampling_params", "save_weights_external_response", "save_weights_for_sampler_response",
    "save_weights_response", "search_owner", "session_search_cursor", "session_search_request",
    "session_search_response", "session_status", "session_status_query", "session_summary", "stop_reason",
    "tensor_dtype", "topk_logprobs", "training_run", "training_runs_response", "weights_info_response",
    "whoami_response",
)  # fmt: skip


def _register_sdk_type_modules() -> None:
    import sys
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    names = {name: globals()[name] for name in __all__}
    for short in _SDK_TYPE_MODULES:
        module = ModuleType(f"{__name__}.{short}", f"The Tinker SDK's tinker.types.{short}: this package's types.")
        module.__spec__ = ModuleSpec(module.__name__, None)  # importlib.util.find_spec finds it
        module.__dict__.update(names)
        sys.modules.setdefault(module.__name__, module)
        globals().setdefault(short, sys.modules[module.__name__])


_register_sdk_type_modules()
