"""Provenance of a Datum's tokens: which sampled sequence each position came from (Tinker 0.33+).

A list of spans tiles one field of a Datum: span lengths add up to its length, and positions follow
from the order. `stable_reinforce` needs provenance on every datum (`Datum.with_provenance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

__all__ = ["PromptProvenanceSpan", "SampledProvenanceSpan", "ProvenanceSpans"]


def _check_span(kind: str, sequence_id, offset, length) -> None:
    if not isinstance(sequence_id, str) or not sequence_id:
        raise ValueError(f"{kind}.sequence_id must be a non-empty string (a SampledSequence.sequence_id), "
                         f"got {sequence_id!r}")
    for name, value in (("offset", offset), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{kind}.{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """`length` positions that were positions [offset, offset + length) of the prompt of the
    sampling request that returned the sequence `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span("PromptProvenanceSpan", self.sequence_id, self.offset, self.length)


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """`length` positions that were the sampled tokens [offset, offset + length) of the sequence
    `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span("SampledProvenanceSpan", self.sequence_id, self.offset, self.length)


ProvenanceSpans = List[Union[PromptProvenanceSpan, SampledProvenanceSpan]]
