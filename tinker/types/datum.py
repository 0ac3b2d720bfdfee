"""Datum (one training example), loss-function names, and the forward/backward input and output."""

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

import numpy as np

from .model_input import ModelInput
from .provenance import PromptProvenanceSpan, ProvenanceSpans, SampledProvenanceSpan
from .tensor_data import TensorData, _is_torch_tensor

__all__ = ["Datum", "LossFnInputs", "LossFnOutput", "LossFnType", "ForwardBackwardInput", "ForwardBackwardOutput"]

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                     "custom"]

LossFnInputs = Dict[str, TensorData]
LossFnOutput = Dict[str, TensorData]

# dtype of each loss_fn_inputs key given as a plain list
_KEY_DTYPES = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}


def _to_tensor_data(key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if _is_torch_tensor(value):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, (list, tuple)):
        if key not in _KEY_DTYPES:
            raise KeyError(f"loss_fn_inputs[{key!r}] is a list, and its dtype is only known for the keys "
                           f"{', '.join(_KEY_DTYPES)}; pass a TensorData, numpy array or torch tensor instead")
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(f"loss_fn_inputs[{key!r}] is a ragged nested list; rows must have equal lengths") from None
        try:
            return TensorData(data=array, dtype=_KEY_DTYPES[key], shape=list(array.shape))
        except ValueError as exc:
            raise ValueError(f"loss_fn_inputs[{key!r}]: {exc}") from None
    raise TypeError(f"loss_fn_inputs[{key!r}] must be a TensorData, numpy array, torch tensor or list, got "
                    f"{type(value).__name__}")


@dataclass(frozen=True)
class Datum:
    """One example: the model input and its loss inputs (per-token arrays aligned with the input).

    `loss_fn_inputs` values may be given as TensorData, numpy arrays, torch tensors or (nested)
    lists (dtype taken from the key); they are stored as TensorData. The dict stays mutable.
    """

    model_input: ModelInput
    loss_fn_inputs: LossFnInputs = field(default_factory=dict)
    model_input_spans: Optional[ProvenanceSpans] = None
    """Provenance of the input tokens: spans tiling `model_input` (set with `with_provenance`)."""
    loss_fn_input_spans: Optional[ProvenanceSpans] = None
    """Provenance of the loss rows: spans tiling `loss_fn_inputs["target_tokens"]`."""

    def __post_init__(self):
        if not isinstance(self.model_input, ModelInput):
            raise TypeError(f"Datum.model_input must be a ModelInput (e.g. ModelInput.from_ints(tokens)), got "
                            f"{type(self.model_input).__name__}")
        if not isinstance(self.loss_fn_inputs, Mapping):
            raise TypeError(f"Datum.loss_fn_inputs must be a dict of name -> tensor, got "
                            f"{type(self.loss_fn_inputs).__name__}")
        converted = {}
        for key, value in self.loss_fn_inputs.items():
            if not isinstance(key, str):
                raise TypeError(f"Datum.loss_fn_inputs keys must be strings, got {key!r}")
            converted[key] = _to_tensor_data(key, value)
        object.__setattr__(self, "loss_fn_inputs", converted)
        for name in ("model_input_spans", "loss_fn_input_spans"):
            object.__setattr__(self, name, _check_spans(name, getattr(self, name)))
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both model_input_spans and loss_fn_input_spans, or "
                             "neither (Datum.with_provenance sets both)")

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> "Datum":
        """A copy that says which sampled sequence each position came from: `model_input` spans tile
        the input tokens, `loss_fn_inputs` spans tile the rows of `target_tokens`. A miscount raises
        ValueError here, not later in a training request."""
        _check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) >= 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return replace(self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs))


def _check_spans(name: str, spans) -> Optional[list]:
    if spans is None:
        return None
    if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
        raise TypeError(f"Datum.{name} must be a list of PromptProvenanceSpan / SampledProvenanceSpan")
    spans = list(spans)
    for span in spans:
        if not isinstance(span, (PromptProvenanceSpan, SampledProvenanceSpan)):
            raise TypeError(f"Datum.{name} entries must be PromptProvenanceSpan or SampledProvenanceSpan, got "
                            f"{type(span).__name__}")
    return spans


def _check_tiling(field_name: str, spans, expected: int) -> None:
    spans = _check_spans(field_name, spans)
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(f"with_provenance {field_name} spans cover {total} positions but the field has {expected}; "
                         f"the spans must tile it exactly")


@dataclass(frozen=True)
class ForwardBackwardInput:
    """The data and loss of a forward or forward_backward request."""

    data: List[Datum]
    loss_fn: LossFnType
    loss_fn_config: Optional[Mapping[str, Union[float, str]]] = None


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Per-datum loss outputs (e.g. `loss_fn_outputs[i]["logprobs"]`) and metrics such as
    `metrics["loss:sum"]`. There is no `.loss` attribute."""

    loss_fn_output_type: str
    loss_fn_outputs: List[LossFnOutput]
    metrics: Dict[str, float] = field(default_factory=dict)
