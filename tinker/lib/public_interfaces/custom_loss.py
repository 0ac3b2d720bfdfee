"""Custom losses made with ServiceClient.create_custom_loss and run by handle (Tinker 0.36+).

A per-datum loss `fn(logprobs, *inputs) -> (scalar loss, {"custom/<name>:sum"|":mean": scalar})`
reads the datum's target logprobs and the loss_fn_inputs keys named by its other parameters. Here it
always runs in this process (there is no server to upload it to): forward_backward_custom calls it
on every datum, sums the losses, and reduces the metrics by their suffix.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ...types import CustomLossInput

__all__ = ["LossHandle", "PerDatumLossFn"]

# (logprobs, *the loss_fn_inputs it reads) -> (scalar loss, scalar metrics keyed custom/<name>:sum or :mean)
PerDatumLossFn = Callable[..., Tuple[Any, Mapping[str, Any]]]

_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")


@dataclass(frozen=True)
class LossHandle:
    """A loss from ServiceClient.create_custom_loss; pass it to TrainingClient.forward_backward_custom."""

    name: str
    inputs: Tuple[CustomLossInput, ...]
    """`logprobs`, then the loss_fn_inputs keys the loss reads, in its parameter order, with ranks."""
    session_id: str
    fn: PerDatumLossFn = field(repr=False, compare=False)
    loss_id: Optional[str] = None
    """The server's id of an uploaded loss; always None here (the loss runs in this process)."""

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(i.name for i in self.inputs[1:])


def make_handle(fn: PerDatumLossFn, input_ranks: Mapping[str, int], session_id: str) -> LossHandle:
    """Checks fn's parameters against input_ranks (logprobs first, one rank per parameter)."""
    if not callable(fn):
        raise TypeError(f"create_custom_loss needs a function, got {type(fn).__name__}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(f"create_custom_loss: cannot read the parameters of {fn!r}: {e}") from None
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        raise ValueError("create_custom_loss: the loss takes plain positional parameters only "
                         "(logprobs, then one per loss_fn_inputs key)")
    names = [p.name for p in params]
    if not names or names[0] != "logprobs":
        raise ValueError(f"create_custom_loss: the loss's first parameter must be `logprobs`, got {names}")
    ranks = dict(input_ranks)
    if set(ranks) != set(names):
        raise ValueError(f"create_custom_loss: input_ranks must give one rank per parameter of the loss "
                         f"({names}), got {sorted(ranks)}")
    inputs = []
    for name in names:
        rank = ranks[name]
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise ValueError(f"create_custom_loss: the rank of {name!r} must be 0, 1 or 2, got {rank!r}")
        inputs.append(CustomLossInput(name=name, rank=rank))
    return LossHandle(name=getattr(fn, "__name__", "loss"), inputs=tuple(inputs), session_id=session_id, fn=fn)


def check_inputs(handle: LossHandle, data) -> None:
    """Every datum has each input at its declared rank; logprobs has target_tokens' rank."""
    logprobs, *rest = handle.inputs
    for i, datum in enumerate(data):
        for spec, key in [(logprobs, "target_tokens"), *((x, x.name) for x in rest)]:
            if key not in datum.loss_fn_inputs:
                raise ValueError(f"datum[{i}] has no loss_fn_inputs[{key!r}], which loss {handle.name!r} takes")
            shape = datum.loss_fn_inputs[key].shape
            rank = 1 if shape is None else len(shape)
            if rank != spec.rank:
                raise ValueError(f"datum[{i}] loss_fn_inputs[{key!r}] has rank {rank}, but loss {handle.name!r} "
                                 f"declared {spec.name} with rank {spec.rank}")


def run_handle(handle: LossHandle, data, logprobs_list: List[Any]) -> Tuple[Any, Dict[str, float]]:
    """The summed loss of every datum, and the metrics: `:sum` keys added, `:mean` keys averaged."""
    import torch

    total = None
    sums: Dict[str, float] = {}
    for datum, logprobs in zip(data, logprobs_list):
        inputs = [datum.loss_fn_inputs[name].to_torch() for name in handle.input_names]
        loss, metrics = handle.fn(logprobs, *inputs)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"loss {handle.name!r} must return a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        total = loss if total is None else total + loss
        for key, value in dict(metrics or {}).items():
            if not _METRIC_KEY.fullmatch(key):
                raise ValueError(f"loss {handle.name!r}: metric key {key!r} must look like custom/<name>:sum or "
                                 f"custom/<name>:mean (lowercase)")
            sums[key] = sums.get(key, 0.0) + float(value.detach().item() if isinstance(value, torch.Tensor)
                                                   else value)
    n = max(len(logprobs_list), 1)
    return total, {k: (v / n if k.endswith(":mean") else v) for k, v in sums.items()}
