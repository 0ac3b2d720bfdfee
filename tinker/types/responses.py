"""Responses of training, info and sampling calls."""

import math
import operator
from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np

from ._base import BaseModel
from .params import AdamOptimizerConfig, OptimizerConfig, StopReason
from .tensor_data import TensorData

__all__ = [
    "OptimStepResponse", "SaveWeightsResponse", "SaveWeightsForSamplerResponse", "LoadWeightsResponse",
    "GetInfoResponse", "ModelData", "GetServerCapabilitiesResponse", "SupportedModel", "SampleResponse",
    "SampledSequence", "TopkPromptLogprobs", "TopkLogprobs", "ModelID", "RequestErrorCategory", "PromptAltTokens",
    "SaveWeightsExternalResponse", "ExternalWeightsUrlsResponse",
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


class SaveWeightsExternalResponse(BaseModel):
    path: str
    """`tinker://<model_id>/external_weights/<name>`"""
    type: Optional[Literal["save_weights_external"]] = "save_weights_external"


class ExternalWeightsUrlsResponse(BaseModel):
    """Where the files of saved weights can be downloaded: file name -> URL (`file://` here), and
    when the URLs stop working (None: they do not expire)."""

    urls: Dict[str, str]
    expires: Optional[Any] = None
    encrypted: bool = False
    """True when the files were age-encrypted to the recipients given at save time."""


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
    is_lora: Optional[bool] = None
    lora_rank: Optional[int] = None
    model_name: Optional[str] = None
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    """The optimizer the run was created with (AdamW unless another was chosen)."""


class SupportedModel(BaseModel):
    """A model the server can load. The SDK's fields (model_name, max_context_length, trainable,
    sampleable) come first; `supports_images` and `is_moe` are this local server's additions (None
    where not filled in), so code written for the SDK reads the same fields."""

    model_name: Optional[str] = None
    max_context_length: Optional[int] = None
    trainable: Optional[bool] = None
    sampleable: Optional[bool] = None
    supports_images: Optional[bool] = None
    """Whether model inputs may carry ImageChunks (vision-language models)."""
    is_moe: Optional[bool] = None
    """Whether the model is a mixture of experts (its forward_backward reports the e_* routing metrics)."""


class GetServerCapabilitiesResponse(BaseModel):
    supported_models: List[SupportedModel]
    device: Optional[str] = None
    """The device this local engine runs models on: 'cpu', or 'cuda (<GPU name>)' (a local addition; None where
    not filled in)."""


def _floats(values: Any) -> List[float]:
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).reshape(-1).tolist()
    return [float(v) for v in values]


@dataclass(frozen=True, eq=False)
class TopkPromptLogprobs:
    """Top-k logprobs as arrays: `token_ids` int32 (n, k) and `logprobs` float32 (n, k); missing
    entries (position 0, or fewer than k) are padded with token 0 and logprob -99999.0."""

    token_ids: np.ndarray
    logprobs: np.ndarray


TopkLogprobs = TopkPromptLogprobs  # the 0.33+ name


def _topk_lists(topk: TopkPromptLogprobs) -> List[Optional[List[Tuple[int, float]]]]:
    out = []
    for ids, lps in zip(np.asarray(topk.token_ids).tolist(), np.asarray(topk.logprobs).tolist()):
        pairs = [(int(t), float(lp)) for t, lp in zip(ids, lps) if not (t == TOPK_PAD_TOKEN and lp == TOPK_PAD_LOGPROB)]
        out.append(pairs or None)
    return out


def _topk_arrays(entries) -> TopkPromptLogprobs:
    n = len(entries)
    k = max((len(e) for e in entries if e is not None), default=0)
    token_ids = np.full((n, k), TOPK_PAD_TOKEN, dtype=np.int32)
    logprobs = np.full((n, k), TOPK_PAD_LOGPROB, dtype=np.float32)
    for i, entry in enumerate(entries):
        for j, (token, logprob) in enumerate(entry or ()):
            token_ids[i, j] = token
            logprobs[i, j] = logprob
    return TopkPromptLogprobs(token_ids=token_ids, logprobs=logprobs)


@dataclass(frozen=True)
class SampledSequence:
    """One sample: the generated tokens only (the matched stop token or string included), their
    log-probabilities, why generation stopped ("stop" or "length"), and its `sequence_id`.

    Built either the 0.25 way, `SampledSequence(stop_reason, tokens, logprobs)`, or the 0.33+ way,
    `SampledSequence(stop_reason, sequence_id, tokens_np=..., logprobs_np=..., topk_logprobs_np=...)`;
    the list and numpy forms can both be read whichever way it was built.
    `topk_logprobs[i]` are the k most likely (token_id, logprob) of the distribution token i was
    drawn from (with sample(topk_sample_logprobs=k)), most likely first.
    """

    stop_reason: StopReason
    tokens: Optional[List[int]] = None
    logprobs: Optional[List[float]] = None
    sequence_id: Optional[str] = None
    tokens_np: Optional[Any] = field(default=None, repr=False, compare=False)  # np.ndarray int32 [n]
    logprobs_np: Optional[Any] = field(default=None, repr=False, compare=False)  # np.ndarray float32 [n]
    topk_logprobs_np: Optional[Any] = field(default=None, repr=False, compare=False)  # TopkLogprobs [n, k]
    topk_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.stop_reason not in _STOP_REASONS:
            raise ValueError(f"stop_reason must be 'stop' or 'length', got {self.stop_reason!r}")
        tokens = self.tokens
        if isinstance(tokens, str):  # 0.33+ positional order: (stop_reason, sequence_id, ...)
            object.__setattr__(self, "sequence_id", tokens)
            tokens = None
        if tokens is None:
            tokens = [] if self.tokens_np is None else self.tokens_np
        tokens = tokens.reshape(-1).tolist() if isinstance(tokens, np.ndarray) else [operator.index(t) for t in tokens]
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "tokens_np", np.asarray(tokens, dtype=np.int32))
        logprobs = self.logprobs
        if logprobs is None and self.logprobs_np is not None:
            logprobs = self.logprobs_np
        if logprobs is not None:
            logprobs = _floats(logprobs)
            if len(logprobs) != len(tokens):
                raise ValueError(f"SampledSequence has {len(tokens)} tokens but {len(logprobs)} logprobs")
            object.__setattr__(self, "logprobs_np", np.asarray(logprobs, dtype=np.float32))
        object.__setattr__(self, "logprobs", logprobs)
        if self.topk_logprobs is not None:
            entries = _topk_entries(self.topk_logprobs)
            object.__setattr__(self, "topk_logprobs", entries)
            if self.topk_logprobs_np is None:
                object.__setattr__(self, "topk_logprobs_np", _topk_arrays(entries))
        elif self.topk_logprobs_np is not None:
            object.__setattr__(self, "topk_logprobs", _topk_lists(self.topk_logprobs_np))


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
class PromptAltTokens:
    """k independent draws, at the request's temperature, from the model's next-token distribution at
    every prompt position after the first: `tokens` int64 and `logprobs` float32, both
    [len(prompt) - 1, k]; row i holds alternatives to prompt[i + 1]."""

    tokens: TensorData
    logprobs: TensorData


@dataclass(frozen=True)
class SampleResponse:
    """The samples of one prompt, plus its prompt logprobs when asked for.

    `prompt_logprobs[i]` is log p(prompt[i] | prompt[:i]) (None at 0, and before the last n with
    prompt_logprobs_last_n); `topk_prompt_logprobs[i]` is None there too, else up to k
    (token_id, logprob) pairs, most likely first. The `*_np` forms hold the same as arrays (NaN or
    padding where None); either form may be given when building one.
    """

    sequences: Sequence[SampledSequence]
    prompt_logprobs: Optional[List[Optional[float]]] = None
    topk_prompt_logprobs: Optional[List[Optional[List[Tuple[int, float]]]]] = None
    prompt_cache_hit_tokens: int = 0
    prompt_logprobs_np: Optional[Any] = field(default=None, repr=False, compare=False)  # np.ndarray float32 [P], NaN = None
    topk_prompt_logprobs_np: Optional[Any] = field(default=None, repr=False, compare=False)  # TopkLogprobs [P, k]
    target_prompt_logprobs: Optional[Any] = None  # TensorData
    """float32 logprobs of SampleRequest.target_prompt_logprobs' ids, same shape; 0.0 where it had -1."""
    prompt_alt_tokens: Optional[Any] = None  # PromptAltTokens

    def __post_init__(self):
        sequences = [SampledSequence(**s) if isinstance(s, dict) else s for s in self.sequences]
        for s in sequences:
            if not isinstance(s, SampledSequence):
                raise TypeError(f"SampleResponse.sequences must hold SampledSequence objects, got {type(s).__name__}")
        object.__setattr__(self, "sequences", sequences)
        plp = self.prompt_logprobs
        if plp is None and self.prompt_logprobs_np is not None:
            plp = self.prompt_logprobs_np
        if plp is not None:
            plp = _prompt_logprobs(plp)
            object.__setattr__(self, "prompt_logprobs_np",
                               np.array([math.nan if v is None else v for v in plp], dtype=np.float32))
        object.__setattr__(self, "prompt_logprobs", plp)
        topk = self.topk_prompt_logprobs
        if isinstance(topk, TopkPromptLogprobs):
            object.__setattr__(self, "topk_prompt_logprobs_np", topk)
            topk = None
        if topk is None and self.topk_prompt_logprobs_np is not None:
            topk = _topk_lists(self.topk_prompt_logprobs_np)
        elif topk is not None:
            topk = _topk_entries(topk)
            object.__setattr__(self, "topk_prompt_logprobs_np", _topk_arrays(topk))
        object.__setattr__(self, "topk_prompt_logprobs", topk)
        object.__setattr__(self, "prompt_cache_hit_tokens", operator.index(self.prompt_cache_hit_tokens))
