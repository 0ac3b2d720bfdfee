"""Inputs of a custom loss made with ServiceClient.create_custom_loss (Tinker 0.36+)."""

from typing import Literal

from ._base import StrictBase

__all__ = ["CustomLossInput", "CustomLossInputRank"]

CustomLossInputRank = Literal[0, 1, 2]
"""A custom loss input's rank: 0 a scalar, 1 [T], 2 [T, K]."""


class CustomLossInput(StrictBase):
    """One parameter of a custom loss: `logprobs`, or the loss_fn_inputs key it reads, and its rank."""

    name: str
    rank: CustomLossInputRank
