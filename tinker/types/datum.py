"""Datum (one training example), loss-function names, and the forward/backward input and output."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

import numpy as np

from .model_input import ModelInput
from .tensor_data import TensorData, _is_torch_tensor

__all__ = ["Datum", "LossFnInputs", "LossFnOutput", "LossFnType", "ForwardBackwardInput", "ForwardBackwardOutput"]

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]

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
