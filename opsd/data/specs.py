"""Verifier specs: how a row says its replies are scored (see :mod:`opsd.data.verifiers`).

A spec is plain data stored with the row (JSONL, Parquet), so it is validated
when the dataset loads: a pattern that does not compile or an unknown
reasoning-gym task fails before any model runs, not hours into a run.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, Union

# The `regex` engine (a transformers dependency) instead of `re`: the same syntax, and a search
# can be given a time limit, so a pattern with catastrophic backtracking cannot hang evaluation
# (opsd.data.verifiers applies the limit).
import regex as re
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo such as ``privileged_contex`` must not be dropped silently."""

    model_config = ConfigDict(extra="forbid")


# A verifier pattern is a rule ("starts with 'Sure'"), not a program: a longer one is refused.
MAX_PATTERN_CHARS = 4096


class RegexVerifier(StrictModel):
    """Passes when ``re.search(pattern, reply)`` matches (within a time limit).

    The reply is the decoded response with special tokens removed but *not*
    stripped, so anchored patterns should allow surrounding whitespace
    (``^\\s*Sure thing!``, ``Hope this helps!\\s*$``).
    """

    type: Literal["regex"] = "regex"
    flags: str = Field("", description="Any of 'i', 'm', 's', 'x' (IGNORECASE, MULTILINE, DOTALL, VERBOSE).")
    pattern: str = Field(max_length=MAX_PATTERN_CHARS)
    description: str | None = Field(
        None, description="Human phrase completing 'The reply should ...', e.g. \"start with 'Sure thing!'\"."
    )

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, value: str) -> str:
        unknown = sorted(set(value) - set(_REGEX_FLAGS))
        if unknown:
            raise ValueError(f"unknown regex flag(s) {''.join(unknown)!r}; use any of 'i', 'm', 's', 'x'")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str, info: ValidationInfo) -> str:
        try:
            re.compile(value, _flag_bits(info.data.get("flags", "")))
        except re.error as err:
            reason = f"regex does not compile: {err}; fix the pattern (escape literal characters)"
            raise ValueError(reason) from None
        return value

    def compiled(self) -> re.Pattern:
        return re.compile(self.pattern, _flag_bits(self.flags))


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def _flag_bits(flags: str) -> int:
    bits = 0
    for letter in flags:
        bits |= _REGEX_FLAGS[letter]
    return bits


class ExactVerifier(StrictModel):
    """Compares the reply's final answer with ``value`` or, when unset, ``row.answer``."""

    type: Literal["exact"] = "exact"
    value: str | None = None
    normalize: bool = Field(True, description="Strip, casefold and collapse whitespace on both sides.")


class MathVerifier(StrictModel):
    """Checks mathematical equivalence (math-verify) with ``value`` or, when unset, ``row.answer``."""

    type: Literal["math"] = "math"
    value: str | None = None


class ReasoningGymVerifier(StrictModel):
    """Scores with the reasoning-gym task's own scorer; ``entry`` is the dataset entry it needs."""

    type: Literal["reasoning_gym"] = "reasoning_gym"
    task: str
    entry: dict[str, Any]

    @field_validator("task")
    @classmethod
    def _registered(cls, value: str) -> str:
        reason = cls.unknown_task_reason(value)
        if reason:
            raise ValueError(reason)
        return value

    @staticmethod
    def unknown_task_reason(task: str) -> str | None:
        """None when reasoning-gym knows ``task``, else a reason naming close task names."""
        from reasoning_gym.factory import DATASETS  # slow import (~1.5 s): only when needed

        if task in DATASETS:
            return None
        close = difflib.get_close_matches(task, DATASETS, n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(DATASETS)[:5])}"
        return f"unknown reasoning-gym task {task!r}; {hint}"


VerifierSpec = Annotated[
    Union[RegexVerifier, ExactVerifier, MathVerifier, ReasoningGymVerifier],
    Field(discriminator="type"),
]
VERIFIER_TYPES = ("regex", "exact", "math", "reasoning_gym")
