"""Checkpoints, training runs, sessions and the other REST-client types, and `tinker://` paths.

Checkpoint paths: `tinker://<training_run_id>/weights/<name>` (save_state: weights + optimizer)
and `tinker://<training_run_id>/sampler_weights/<name>` (save_weights_for_sampler).
"""

from datetime import datetime
from typing import Dict, List, Literal, Optional

from .._exceptions import InvalidArgumentError
from ._base import BaseModel
from .params import AdamOptimizerConfig, OptimizerConfig

__all__ = [
    "Checkpoint", "CheckpointType", "ParsedCheckpointTinkerPath", "TrainingRun", "Cursor", "TrainingRunsResponse",
    "CheckpointsListResponse", "CheckpointArchiveUrlResponse", "WeightsInfoResponse", "GetSessionResponse",
    "ListSessionsResponse", "GetSamplerResponse", "WhoamiResponse", "AuditLogEntry", "AuditLogResponse",
]  # fmt: skip

CheckpointType = Literal["training", "sampler", "external"]

TINKER_PREFIX = "tinker://"
CHECKPOINT_TYPE_OF_KIND = {"weights": "training", "sampler_weights": "sampler",
                           "external_weights": "external"}  # path kind -> CheckpointType


class Checkpoint(BaseModel):
    checkpoint_id: str
    """Includes the kind, e.g. "weights/0010" or "sampler_weights/final"."""
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: Optional[int] = None
    public: bool = False
    user_metadata: Optional[Dict[str, str]] = None
    """What save_state / save_weights_for_sampler were given as user_metadata."""
    expires_at: Optional[datetime] = None


class ParsedCheckpointTinkerPath(BaseModel):
    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str
    """"<weights|sampler_weights>/<name>"."""

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> "ParsedCheckpointTinkerPath":
        """Parses `tinker://<run>/<weights|sampler_weights>/<name>`; ValueError if it is not one."""
        if not isinstance(tinker_path, str):
            raise InvalidArgumentError(f"a tinker path must be a string, got {type(tinker_path).__name__}")
        if not tinker_path.startswith(TINKER_PREFIX):
            raise InvalidArgumentError(f"Invalid tinker path {tinker_path!r}: it must start with {TINKER_PREFIX!r}")
        parts = tinker_path[len(TINKER_PREFIX):].split("/")
        if len(parts) != 3:
            raise InvalidArgumentError(f"Invalid tinker path {tinker_path!r}: expected "
                             f"tinker://<training_run_id>/<weights|sampler_weights>/<name>")
        run_id, kind, name = parts
        if kind not in CHECKPOINT_TYPE_OF_KIND:
            raise InvalidArgumentError(f"Invalid tinker path {tinker_path!r}: the checkpoint kind must be 'weights', "
                             f"'sampler_weights' or 'external_weights', got {kind!r}")
        for part in (run_id, name):
            if part in ("", ".", "..") or "\0" in part:
                raise InvalidArgumentError(f"Invalid tinker path {tinker_path!r}: {part!r} is not a valid run id or "
                                 f"checkpoint name")
        return cls(tinker_path=tinker_path, training_run_id=run_id, checkpoint_type=CHECKPOINT_TYPE_OF_KIND[kind],
                   checkpoint_id=f"{kind}/{name}")


class TrainingRun(BaseModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: Optional[int] = None
    last_request_time: datetime
    last_checkpoint: Optional[Checkpoint] = None
    last_sampler_checkpoint: Optional[Checkpoint] = None
    user_metadata: Optional[Dict[str, str]] = None


class Cursor(BaseModel):
    offset: int
    limit: int
    total_count: int


class TrainingRunsResponse(BaseModel):
    training_runs: List[TrainingRun]
    cursor: Cursor


class CheckpointsListResponse(BaseModel):
    checkpoints: List[Checkpoint]
    cursor: Optional[Cursor] = None


class CheckpointArchiveUrlResponse(BaseModel):
    url: str
    expires: datetime


class WeightsInfoResponse(BaseModel):
    base_model: str
    is_lora: bool
    lora_rank: Optional[int] = None
    train_unembed: Optional[bool] = None
    train_mlp: Optional[bool] = None
    train_attn: Optional[bool] = None
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    """The optimizer of the training run that saved the checkpoint."""


class GetSessionResponse(BaseModel):
    training_run_ids: List[str]
    sampler_ids: List[str]
    user_metadata: Optional[Dict[str, str]] = None
    display_name: Optional[str] = None


class ListSessionsResponse(BaseModel):
    sessions: List[str]


class GetSamplerResponse(BaseModel):
    sampler_id: str
    base_model: str
    model_path: Optional[str] = None


LOCAL_ORG_URN = "urn:tinker:local:org"


class WhoamiResponse(BaseModel):
    user_urn: str
    org_urn: str = LOCAL_ORG_URN
    """Required by the service's type; defaults here to the one organization a machine has."""
    email: Optional[str] = None


class AuditLogEntry(BaseModel):
    timestamp: datetime
    event: str
    event_details: Dict[str, object] = {}
    model_id: Optional[str] = None
    tinker_path: Optional[str] = None
    purpose: Optional[str] = None


class AuditLogResponse(BaseModel):
    entries: List[AuditLogEntry]
