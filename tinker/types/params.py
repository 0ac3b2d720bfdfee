"""Request parameters: optimizer (AdamParams), LoRA (LoraConfig), sampling (SamplingParams), and the
optim-step and sample requests."""

import operator
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from ._base import BaseModel, StrictBase, _check, _finite
from .model_input import ModelInput

__all__ = ["AdamParams", "LoraConfig", "SamplingParams", "OptimStepRequest", "SampleRequest", "StopReason",
           "OptimizerConfigBase", "AdamOptimizerConfig", "DimuonOptimizerConfig", "OptimizerConfig",
           "OptimParamsBase", "DimuonParams", "OptimParams", "SamplingClientKind"]  # fmt: skip

from .service import SamplingClientKind  # noqa: E402  (one definition, in service.py)

StopReason = Literal["length", "stop"]


class AdamParams(StrictBase):
    """AdamW hyperparameters (decoupled weight decay, as torch.optim.AdamW; default decay 0).
    `grad_clip_norm` > 0 clips the global gradient norm; 0 disables clipping.

    As in the SDK, any finite values construct; values the optimizer cannot run (a beta outside
    [0, 1), a negative rate) are refused by optim_step with a BadRequestError."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @field_validator("*")
    @classmethod
    def _finite_values(cls, value: float, info) -> float:
        return _finite(info.field_name, value)


class OptimizerConfigBase(StrictBase):
    """The optimizer family a training client uses for its whole life, chosen at creation (`type`)."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())
    type: str


class AdamOptimizerConfig(OptimizerConfigBase):
    """AdamW, the default: each optim_step takes AdamParams."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(OptimizerConfigBase):
    """Dimuon: each optim_step takes DimuonParams. (This local engine cannot run it: its update rule
    is not public; see TrainingClient.optim_step.)"""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig = Union[AdamOptimizerConfig, DimuonOptimizerConfig, OptimizerConfigBase]


class OptimParamsBase(StrictBase):
    """Per-step hyperparameters of a non-Adam optimizer family (`type`)."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())
    type: str


class DimuonParams(OptimParamsBase):
    """Hyperparameters of one Dimuon step."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = 0.0
    """Maximum global gradient norm; nonpositive values disable clipping."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """EMA coefficient of the momentum."""


OptimParams = Union[AdamParams, DimuonParams, OptimParamsBase]


class LoraConfig(StrictBase):
    """LoRA adapter settings: rank, init seed, and which parts of the model get adapters. As in the
    SDK the rank is not range-checked here; creating an adapter refuses one it cannot make."""

    rank: int
    seed: Optional[int] = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


def _stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"stop must be a string, a list of strings or a list of token ids, got {value!r}")
    items = list(value)
    if all(isinstance(s, str) for s in items):
        return items
    ids = []
    for s in items:
        if isinstance(s, (str, bool, np.bool_)) or not hasattr(s, "__index__"):
            raise ValueError(f"stop must be a string, a list of strings or a list of token ids (not a mix), "
                             f"got {value!r}")
        ids.append(operator.index(s))
    return ids


class SamplingParams(BaseModel):
    """How to sample. Unknown fields are ignored.

    `temperature` 0 is greedy; `top_k` -1 (or 0) and `top_p` 1 disable those filters; `stop` is a
    stop string, a list of stop strings, or a list of stop token ids (the matched stop is included
    in the returned tokens). As in the SDK, the SDK's fields are not range-checked here: `top_p`
    <= 0 keeps the most likely token only, > 1 keeps all, and a negative or NaN temperature, a
    negative max_tokens or a top_k below -1 are refused when sampling.

    `min_p`, `repetition_penalty`, `presence_penalty` and `frequency_penalty` are extensions of
    this local engine; Tinker's service does not have them and ignores them. Their defaults
    disable them.
    """

    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, Sequence[str], Sequence[int], None] = None
    temperature: float = 1
    top_k: int = -1
    top_p: float = 1
    # extensions (not in Tinker)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stop(value)

    @model_validator(mode="after")
    def _ranges(self) -> "SamplingParams":
        # the SDK's fields take any value here, as in the SDK; sampling refuses what it cannot run
        # (a negative or NaN temperature, max_tokens < 0, top_k < -1) with a BadRequestError
        for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _finite(name, getattr(self, name))
        _check("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1] (0 disables it)")
        _check("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1 disables it)")
        return self


class OptimStepRequest(StrictBase):
    """The wire form of an optim_step: `optim_params` (also accepted as `adam_params` or
    `optimizer_params`) are AdamParams or another family's params such as DimuonParams."""

    optim_params: OptimParams = Field(validation_alias=AliasChoices("optim_params", "adam_params",
                                                                    "optimizer_params"))
    model_id: str  # ModelID
    seq_id: Optional[int] = None
    type: Literal["optim_step"] = "optim_step"

    @property
    def adam_params(self) -> Optional[AdamParams]:
        """The params when they are AdamParams (the 0.25-era field name), else None."""
        return self.optim_params if isinstance(self.optim_params, AdamParams) else None


class SampleRequest(StrictBase):
    """The wire form of a sample call."""

    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: Optional[str] = None
    model_path: Optional[str] = None
    sampling_session_id: Optional[str] = None
    seq_id: Optional[int] = None
    prompt_logprobs: Optional[bool] = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Optional[Any] = None
    """int64 token ids [len(prompt) - 1, K] (a TensorData or array): cell [i, j] is scored at prompt
    position i + 1; -1 asks for nothing."""
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: Optional[int] = None
    record_stability_info: Optional[bool] = None
    type: Literal["sample"] = "sample"

    @field_validator("num_samples")
    @classmethod
    def _num_samples(cls, value: int) -> int:
        return _check("num_samples", value, value >= 1, ">= 1")

    @field_validator("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
    @classmethod
    def _topk(cls, value: int, info) -> int:
        return _check(info.field_name, value, value >= 0, ">= 0")

