"""Types of the service-level calls added in SDK 0.33-0.38: sampling-client kinds, copied weights,
session search, billing usage and checkpoint storage usage.

Locally, sessions are found in the checkpoint store (a session appears once one of its training
runs saved a checkpoint) and in this process's live ServiceClients; nothing is billed. The types
keep the service's fields, so code that reads them runs unchanged.
"""

from datetime import datetime
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import Field

from ._base import BaseModel, StrictBase

__all__ = [
    "SamplingClientKind", "CopyWeightsResponse",
    "OwnSearchOwner", "AccessibleSearchOwner", "UserSearchOwner", "SearchOwner",
    "ActiveSessionStatusQuery", "CancelledSessionStatusQuery", "FailedSessionStatusQuery",
    "ClientFinishedSessionStatusQuery", "SessionStatusQuery",
    "SessionActive", "SessionCancelled", "SessionFailed", "ClientSessionFinished", "SessionStatus",
    "SessionSearchCursor", "SessionSearchRequest", "SessionSummary", "SessionSearchResponse",
    "TrainingBillingEvent", "SamplingPrefillBillingEvent", "SamplingSampleBillingEvent", "CheckpointBillingEvent",
    "StorageBillingEvent", "BillingEventInfo", "BillingUsageEvent", "BillingUsageSession", "BillingUsageResponse",
    "CurrentCheckpointStorageUsageItem", "CurrentCheckpointStorageUsageResponse",
]  # fmt: skip

SamplingClientKind = Literal["snapshot", "inflight"]
"""`snapshot` (the default): the sampler keeps the weights of its save. `inflight`: samplers that
follow later saves of the same training run."""

ClientSessionFinishReasonType = Literal["success", "errored", "interrupted"]


class CopyWeightsResponse(BaseModel):
    tinker_path: str
    """Path of the newly created copy."""


# ---- session search --------------------------------------------------------------------------------


class OwnSearchOwner(StrictBase):
    """The caller's own sessions."""

    type: Literal["own"] = "own"


class AccessibleSearchOwner(StrictBase):
    """Every owner's sessions."""

    type: Literal["accessible"] = "accessible"


class UserSearchOwner(StrictBase):
    """The listed users' sessions (1 to 10 owner URNs)."""

    type: Literal["user"] = "user"
    owner_urns: List[str] = Field(min_length=1, max_length=10)


SearchOwner = Annotated[Union[OwnSearchOwner, AccessibleSearchOwner, UserSearchOwner], Field(discriminator="type")]


class ActiveSessionStatusQuery(StrictBase):
    type: Literal["active"] = "active"


class CancelledSessionStatusQuery(StrictBase):
    type: Literal["cancelled"] = "cancelled"


class FailedSessionStatusQuery(StrictBase):
    type: Literal["failed"] = "failed"


class ClientFinishedSessionStatusQuery(StrictBase):
    type: Literal["client_finished"] = "client_finished"
    reasons: Optional[List[ClientSessionFinishReasonType]] = Field(default=None, min_length=1)
    """Any of these finish reasons; None matches every reason."""


SessionStatusQuery = Annotated[
    Union[ActiveSessionStatusQuery, CancelledSessionStatusQuery, FailedSessionStatusQuery,
          ClientFinishedSessionStatusQuery],
    Field(discriminator="type"),
]


class SessionActive(BaseModel):
    type: Literal["active"] = "active"


class SessionCancelled(BaseModel):
    type: Literal["cancelled"] = "cancelled"
    detail: Optional[str] = None


class SessionFailed(BaseModel):
    type: Literal["failed"] = "failed"
    category: Literal["user", "internal"]
    reason: Dict[str, object]
    message: str


class ClientSessionFinished(BaseModel):
    """The session's client reported it was done (ServiceClient.close)."""

    type: Literal["client_finished"] = "client_finished"
    reason: Dict[str, ClientSessionFinishReasonType]
    """{"type": "success" | "errored" | "interrupted"}"""
    detail: Optional[str] = None


SessionStatus = Annotated[Union[SessionActive, SessionCancelled, SessionFailed, ClientSessionFinished],
                          Field(discriminator="type")]


class SessionSearchCursor(BaseModel):
    """Where the next page starts: pass a response's `next_cursor` back unchanged."""

    last_created_at: datetime
    last_session_id: str


class SessionSearchRequest(StrictBase):
    """A session search: every given filter must hold (`session_id` and `display_name` together match
    either)."""

    session_id: Optional[str] = None
    project_ids: Optional[List[str]] = None
    user_metadata: Dict[str, str] = {}
    display_name: Optional[str] = Field(default=None, min_length=1)
    """Case-insensitive; with several words, each must appear in the name."""
    owner: SearchOwner = OwnSearchOwner()
    statuses: Optional[List[SessionStatusQuery]] = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Optional[SessionSearchCursor] = None


class SessionSummary(BaseModel):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: Optional[SessionStatus] = None
    """None when the session is neither known to be running nor finished."""
    checkpoints_count: int
    display_name: Optional[str] = None
    user_metadata: Optional[Dict[str, str]] = None
    checkpoint_storage_bytes: Optional[int] = None


class SessionSearchResponse(BaseModel):
    """One page of sessions, newest first."""

    sessions: List[SessionSummary]
    next_cursor: Optional[SessionSearchCursor] = None


# ---- billing and storage -----------------------------------------------------------------------------


class TrainingBillingEvent(BaseModel):
    type: Literal["training"] = "training"
    token_count: int


class SamplingPrefillBillingEvent(BaseModel):
    type: Literal["sampling_prefill"] = "sampling_prefill"
    cached: bool
    token_count: int


class SamplingSampleBillingEvent(BaseModel):
    type: Literal["sampling_sample"] = "sampling_sample"
    token_count: int


class CheckpointBillingEvent(BaseModel):
    type: Literal["checkpoint"] = "checkpoint"
    count: int


class StorageBillingEvent(BaseModel):
    type: Literal["storage"] = "storage"
    free: bool = False
    gigabyte_hours: float


BillingEventInfo = Annotated[
    Union[TrainingBillingEvent, SamplingPrefillBillingEvent, SamplingSampleBillingEvent, CheckpointBillingEvent,
          StorageBillingEvent],
    Field(discriminator="type"),
]


class BillingUsageEvent(BaseModel):
    """One hourly bucket of usage."""

    bucket_start: datetime
    bucket_end: datetime
    base_model: Optional[str] = None
    user_id: Optional[str] = None
    user_name: Optional[str] = None
    session_id: Optional[str] = None
    project_id: Optional[str] = None
    estimated_cost_usd: Optional[float] = None
    effective_rate_usd_per_million_tokens: Optional[float] = None
    effective_rate_usd_per_gigabyte_month: Optional[float] = None
    event_info: BillingEventInfo


class BillingUsageSession(BaseModel):
    user_metadata: Optional[Dict[str, str]] = None


class BillingUsageResponse(BaseModel):
    data: List[BillingUsageEvent]
    sessions: Dict[str, BillingUsageSession] = {}
    cost_data_through: Optional[datetime] = None


class CurrentCheckpointStorageUsageItem(BaseModel):
    """Checkpoint storage of one project and owner."""

    project_id: Optional[str] = None
    org_user_urn: Optional[str] = None
    user_email: Optional[str] = None
    user_name: Optional[str] = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: Optional[float] = None


class CurrentCheckpointStorageUsageResponse(BaseModel):
    effective_rate_usd_per_gigabyte_month: Optional[float] = None
    data: List[CurrentCheckpointStorageUsageItem]
