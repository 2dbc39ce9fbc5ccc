"""Loss-free JSON encoding for values that plain JSON would silently change.

``json.dumps`` turns tuples into lists and non-string dict keys into strings;
scorers that compare against such values (reasoning-gym's ARC tasks compare a
parsed board with a tuple of tuples) then score a correct answer as wrong after a
trip through JSONL or Parquet. Tuples, sets and dicts with non-string keys are
therefore wrapped in single-key marker objects that :func:`decode` restores; so are
``fractions.Fraction`` values (reasoning-gym's gsm_symbolic keeps its variables as fractions).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

_TUPLE, _SET, _DICT, _FRACTION = "__tuple__", "__set__", "__dict__", "__fraction__"


def encode(value: Any) -> Any:
    """Return a JSON-serialisable equivalent of ``value`` that :func:`decode` inverts."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Fraction):
        return {_FRACTION: [value.numerator, value.denominator]}
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, tuple):
        return {_TUPLE: [encode(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {_SET: sorted((encode(item) for item in value), key=repr)}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: encode(item) for key, item in value.items()}
        return {_DICT: [[encode(key), encode(item)] for key, item in value.items()]}
    raise TypeError(f"cannot encode {type(value).__name__} value {value!r} as JSON")


def decode(value: Any) -> Any:
    """Invert :func:`encode`; plain JSON without markers passes through unchanged."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key == _TUPLE:
            return tuple(decode(item) for item in inner)
        if key == _SET:
            return {decode(item) for item in inner}
        if key == _DICT:
            return {decode(k): decode(v) for k, v in inner}
        if key == _FRACTION:
            return Fraction(*inner)
    return {key: decode(item) for key, item in value.items()}
