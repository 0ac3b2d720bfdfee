"""Responses of training, info and sampling calls."""

import math
import operator
from dataclasses import dataclass
from enum import StrEnum, auto
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from ._base import BaseModel
from .params import StopReason

__all__ = [
    "OptimStepResponse", "SaveWeightsResponse", "SaveWeightsForSamplerResponse", "LoadWeightsResponse",
    "GetInfoResponse", "ModelData", "GetServerCapabilitiesResponse", "SupportedModel", "SampleResponse",
    "SampledSequence", "TopkPromptLogprobs", "ModelID", "RequestErrorCategory",
]  # fmt: skip

ModelID = str

_STOP_REASONS = ("length", "stop")
TOPK_PAD_TOKEN = 0
TOPK_PAD_LOGPROB = -99999.0


class RequestErrorCategory(StrEnum):
    Unknown = auto()
    Server = auto()
    User = auto()


class OptimStepResponse(BaseModel):
    metrics: Optional[Dict[str, float]] = None


class _SavedPath:
    """Where a saved checkpoint can be looked at. There is no web console or playground here: both
    give the file:// URL of the checkpoint's directory in the local store."""

    def get_console_url(self) -> str:
        from .. import _checkpoints

        return _checkpoints.checkpoint_dir(*_checkpoints.parse_path(self.path)).as_uri()

    def get_playground_url(self) -> str:
        return self.get_console_url()


class SaveWeightsResponse(_SavedPath, BaseModel):
    path: str
    """`tinker://<model_id>/weights/<name>`"""
    type: Optional[Literal["save_weights"]] = None


class SaveWeightsForSamplerResponse(_SavedPath, BaseModel):
    path: str
    """`tinker://<model_id>/sampler_weights/<name>`"""
    type: Optional[Literal["save_weights_for_sampler"]] = None


class LoadWeightsResponse(BaseModel):
    path: Optional[str] = None
    model_id: Optional[str] = None
    type: Optional[Literal["load_weights"]] = "load_weights"


class ModelData(BaseModel):
    arch: Optional[str] = None
    model_name: Optional[str] = None
    tokenizer_id: Optional[str] = None


class GetInfoResponse(BaseModel):
    type: Optional[Literal["get_info"]] = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: Optional[Any] = None
    """The optimizer the run was created with (the service always fills it in)."""
    is_lora: Optional[bool] = None
    lora_rank: Optional[int] = None
    model_name: Optional[str] = None


class SupportedModel(BaseModel):
    model_name: Optional[str] = None
    max_context_length: Optional[int] = None
    trainable: Optional[bool] = None
    sampleable: Optional[bool] = None


class GetServerCapabilitiesResponse(BaseModel):
    supported_models: List[SupportedModel]


def _floats(values: Any) -> List[float]:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).reshape(-1).tolist()
    return [float(v) for v in values]


@dataclass(frozen=True)
class SampledSequence:
    """One sample: the generated tokens only (the matched stop token or string included), their
    log-probabilities, and why generation stopped ("stop" or "length")."""

    stop_reason: StopReason
    tokens: List[int]
    logprobs: Optional[List[float]] = None

    def __post_init__(self):
        if self.stop_reason not in _STOP_REASONS:
            raise ValueError(f"stop_reason must be 'stop' or 'length', got {self.stop_reason!r}")
        tokens = self.tokens
        tokens = tokens.reshape(-1).tolist() if isinstance(tokens, np.ndarray) else [operator.index(t) for t in tokens]
        object.__setattr__(self, "tokens", tokens)
        if self.logprobs is not None:
            logprobs = _floats(self.logprobs)
            if len(logprobs) != len(tokens):
                raise ValueError(f"SampledSequence has {len(tokens)} tokens but {len(logprobs)} logprobs")
            object.__setattr__(self, "logprobs", logprobs)

    @property
    def tokens_np(self) -> np.ndarray:
        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> Optional[np.ndarray]:
        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TopkPromptLogprobs:
    """Top-k prompt logprobs as arrays: `token_ids` int32 (n, k) and `logprobs` float32 (n, k);
    missing entries (position 0, or fewer than k) are padded with token 0 and logprob -99999.0."""

    token_ids: np.ndarray
    logprobs: np.ndarray


def _prompt_logprobs(values: Any) -> List[Optional[float]]:
    if isinstance(values, np.ndarray):
        return [None if math.isnan(v) else v for v in values.astype(np.float64).reshape(-1).tolist()]
    return [None if v is None else float(v) for v in values]


def _topk_entries(values: Any) -> List[Optional[List[Tuple[int, float]]]]:
    out = []
    for entry in values:
        if entry is None:
            out.append(None)
        else:
            out.append([(operator.index(token), float(logprob)) for token, logprob in entry])
    return out


@dataclass(frozen=True)
class SampleResponse:
    """The samples of one prompt, plus its prompt logprobs when asked for.

    `prompt_logprobs[i]` is log p(prompt[i] | prompt[:i]) (None at 0); `topk_prompt_logprobs[i]` is
    None at 0, else up to k (token_id, logprob) pairs, most likely first.
    """

    sequences: Sequence[SampledSequence]
    prompt_logprobs: Optional[List[Optional[float]]] = None
    topk_prompt_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
    prompt_cache_hit_tokens: int = 0

    def __post_init__(self):
        sequences = [SampledSequence(**s) if isinstance(s, dict) else s for s in self.sequences]
        for s in sequences:
            if not isinstance(s, SampledSequence):
                raise TypeError(f"SampleResponse.sequences must hold SampledSequence objects, got {type(s).__name__}")
        object.__setattr__(self, "sequences", sequences)
        if self.prompt_logprobs is not None:
            object.__setattr__(self, "prompt_logprobs", _prompt_logprobs(self.prompt_logprobs))
        if self.topk_prompt_logprobs is not None:
            object.__setattr__(self, "topk_prompt_logprobs", _topk_entries(self.topk_prompt_logprobs))
        object.__setattr__(self, "prompt_cache_hit_tokens", operator.index(self.prompt_cache_hit_tokens))

    @property
    def prompt_logprobs_np(self) -> Optional[np.ndarray]:
        """float32, NaN where a logprob is None; None when prompt logprobs were not requested."""
        if self.prompt_logprobs is None:
            return None
        return np.array([math.nan if v is None else v for v in self.prompt_logprobs], dtype=np.float32)

    @property
    def topk_prompt_logprobs_np(self) -> Optional[TopkPromptLogprobs]:
        if self.topk_prompt_logprobs is None:
            return None
        n = len(self.topk_prompt_logprobs)
        k = max((len(e) for e in self.topk_prompt_logprobs if e is not None), default=0)
        token_ids = np.full((n, k), TOPK_PAD_TOKEN, dtype=np.int32)
        logprobs = np.full((n, k), TOPK_PAD_LOGPROB, dtype=np.float32)
        for i, entry in enumerate(self.topk_prompt_logprobs):
            for j, (token, logprob) in enumerate(entry or ()):
                token_ids[i, j] = token
                logprobs[i, j] = logprob
        return TopkPromptLogprobs(token_ids=token_ids, logprobs=logprobs)
