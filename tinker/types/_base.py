"""The two pydantic bases of Tinker's types.

`StrictBase` is for inputs and requests: frozen, and unknown fields are an error (typos fail
loudly). `BaseModel` is for responses and `SamplingParams`: frozen, and unknown fields are
silently dropped. Both print as their repr.
"""

import math

import pydantic
from pydantic import ConfigDict

__all__ = ["StrictBase", "BaseModel"]


class StrictBase(pydantic.BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    def __str__(self) -> str:
        return repr(self)


class BaseModel(pydantic.BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    def __str__(self) -> str:
        return repr(self)


def _check(name: str, value, ok: bool, requirement: str):
    """Raises ValueError (pydantic reports it as a ValidationError) unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return value


def _finite(name: str, value: float) -> float:
    return _check(name, value, math.isfinite(value), "a finite number")
