"""Typed reads of JSON files that people and other tools may have edited: checkpoint manifests, PEFT
adapter configs, training run records, model configs.

`read_json(path)` parses a file (OSError when it cannot be read, ValueError for invalid or too deeply
nested JSON). `Fields(where, error)` then reads one field at a time against a `Kind` (the test, and
what it must hold in words). A missing or bad value is an error of the caller's class
(BadRequestError for checkpoints, ModelLoadError for base models) that names the file, the field,
what it holds and what was expected:

    /store/runs/r/weights/a/checkpoint.json: field 'step' holds 'abc' (str); expected a non-negative integer

Values are described with bounded reprs, so a huge or deeply nested value cannot flood a message or
overflow the stack. Integers are bounded and numbers finite where a field says so (JSON also parses
NaN and Infinity).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ._exceptions import BadRequestError

MISSING: Any = object()

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 2, 60, 60, 40
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4


def read_json(path: Path) -> Any:
    """The JSON value in the file: OSError when it cannot be read, ValueError when it is not UTF-8, not
    JSON, or nested too deeply to parse (json raises RecursionError there)."""
    text = Path(path).read_bytes()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def short(value) -> str:
    """repr(value), bounded in length and depth."""
    try:
        return _repr.repr(value)
    except (ValueError, RecursionError):  # an integer past str()'s digit limit; a pathological nesting
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<...>"


def describe(value) -> str:
    """A short, safe description of a JSON value and its type: `'abc' (str)`, `null`."""
    return "null" if value is None else f"{short(value)} ({type(value).__name__})"


@dataclass(frozen=True)
class Kind:
    """What a field must hold: `accepts(value)`, and `expected` in words for the message."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int, expected: str) -> Kind:
    return Kind(expected, lambda v: _is_int(v) and low <= v <= high)


def number(low: float, high: float, expected: str, *, open_low: bool = False) -> Kind:
    """A finite number (an int or a float, not a bool) in [low, high] ((low, high] when open_low)."""

    def accepts(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return (low < v if open_low else low <= v) and v <= high  # exact for ints of any size

    return Kind(expected, accepts)


def optional(kind: Kind) -> Kind:
    return Kind(f"{kind.expected} or null", lambda v: v is None or kind.accepts(v))


def _iso_time(value) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


STRING = Kind("a string", lambda v: isinstance(v, str))
NAME = Kind("a non-empty string", lambda v: isinstance(v, str) and bool(v))
BOOL = Kind("a boolean (true or false)", lambda v: isinstance(v, bool))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
STRING_MAP = Kind("a JSON object of strings", lambda v: isinstance(v, dict) and all(
    isinstance(x, str) for x in v.values()))
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
ISO_TIME = Kind("an ISO 8601 time string", lambda v: isinstance(v, str) and _iso_time(v))
SHA256 = Kind("64 hexadecimal digits (a SHA-256)", lambda v: isinstance(v, str) and len(v) == 64 and all(
    c in "0123456789abcdef" for c in v))


@dataclass(frozen=True)
class Fields:
    """Reads the fields of one JSON object; `where` starts every message (the file's path, and what it is
    when that helps), `error` is the exception class raised."""

    where: str
    error: type = BadRequestError

    def fail(self, message: str) -> Exception:
        return self.error(f"{self.where}: {message}")

    def object(self, value, what: str = "the file") -> dict:
        """`value` itself, when it is a JSON object."""
        if not isinstance(value, dict):
            raise self.fail(f"{what} holds {describe(value)}; expected a JSON object")
        return value

    def get(self, doc: dict, name: str, kind: Kind, default=MISSING, *, label: str | None = None):
        """doc[name], checked against `kind`; `default` when it is absent (an error without one). `label`
        names the field in messages (default: field 'name')."""
        label = label or f"field {name!r}"
        value = doc.get(name, MISSING)
        if value is MISSING:
            if default is MISSING:
                raise self.fail(f"{label} is missing; expected {kind.expected}")
            return default
        if not kind.accepts(value):
            raise self.fail(f"{label} holds {describe(value)}; expected {kind.expected}")
        return value


__all__ = ["MISSING", "read_json", "short", "describe", "Kind", "integer", "number", "optional", "Fields", "STRING",
           "NAME", "BOOL", "OBJECT", "STRING_MAP", "STRINGS", "ISO_TIME", "SHA256"]
