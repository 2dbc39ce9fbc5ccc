"""Score a student's reply against a row's verifier.

A :class:`Verdict` carries a reward for RL-style objectives and routing, and a
feedback sentence that can be fed back to the teacher as privileged context
(so feedback says what was wrong without revealing the expected answer).

Verifiers never raise on model output: an unparsable reply is a failed verdict.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opsd.data import jsonsafe
from opsd.data.rows import Row
from opsd.data.specs import ExactVerifier, MathVerifier, ReasoningGymVerifier, RegexVerifier, VerifierSpec

log = logging.getLogger("opsd")


@dataclass(frozen=True)
class Verdict:
    """``reward`` is 1.0/0.0 for binary verifiers and the task's score for reasoning-gym."""

    passed: bool
    reward: float
    feedback: str


def verify(spec: VerifierSpec, reply: str, row: Row) -> Verdict:
    """Score ``reply`` (decoded response text, special tokens removed, not stripped)."""
    if isinstance(spec, RegexVerifier):
        return _verify_regex(spec, reply)
    if isinstance(spec, ExactVerifier):
        return _verify_exact(spec, reply, _expected(spec, row))
    if isinstance(spec, MathVerifier):
        return _verify_math(reply, _expected(spec, row))
    if isinstance(spec, ReasoningGymVerifier):
        return _verify_reasoning_gym(spec, reply)
    raise TypeError(f"not a verifier spec: {spec!r}")


def _binary(passed: bool, feedback: str) -> Verdict:
    return Verdict(passed, 1.0 if passed else 0.0, feedback)


def _expected(spec: ExactVerifier | MathVerifier, row: Row) -> str:
    expected = spec.value if spec.value is not None else row.answer
    if expected is None:
        raise ValueError(f"row {row.id!r}: a {spec.type!r} verifier needs row.answer or the verifier's value")
    return expected


# A verifier's search stops after this many seconds (OPSD_REGEX_TIMEOUT overrides): a
# pathological pattern (nested quantifiers such as "(a|aa)+$") fails the reply instead of hanging
# the evaluation. The engine checks the clock while it backtracks, so a busy machine may overrun.
REGEX_TIMEOUT_S = 1.0
_slow_patterns: set[str] = set()


def regex_timeout() -> float:
    return float(os.environ.get("OPSD_REGEX_TIMEOUT", REGEX_TIMEOUT_S))


def _verify_regex(spec: RegexVerifier, reply: str) -> Verdict:
    limit = regex_timeout()
    try:
        matched = spec.compiled().search(reply, timeout=limit)
    except TimeoutError:
        if spec.pattern not in _slow_patterns:  # once per pattern, not once per reply
            _slow_patterns.add(spec.pattern)
            log.warning("regex verifier %r gave up after %.1fs on a reply (catastrophic "
                        "backtracking?); such replies count as failed. Simplify the pattern "
                        "(avoid nested quantifiers like (a+)+) or raise OPSD_REGEX_TIMEOUT",
                        spec.pattern, limit)
        return _binary(False, f"The reply could not be checked within {limit:.1f}s.")
    if matched:
        return _binary(True, "The reply follows the rule.")
    rule = spec.description if spec.description else f"match the pattern {spec.pattern!r}"
    return _binary(False, f"The reply should {rule}.")


# --- final answers ------------------------------------------------------------------------------

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def final_answer(reply: str) -> str:
    """The reply's final answer: the text after the last ``answer:`` marker (rest of that
    line, or the next non-empty line), else the last non-empty line; a ``\\boxed{...}``
    around it is removed."""
    markers = list(_ANSWER_MARKER.finditer(reply))
    text = reply[markers[-1].end() :] if markers else reply
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return _unbox(lines[0] if markers else lines[-1])


def _unbox(text: str) -> str:
    """The contents of the last ``\\boxed{...}`` (braces may nest), or ``text`` unchanged."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[begin:position].strip()
            depth -= 1
    return text


def normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace and drop one trailing full stop ("Paris." == "paris")."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _verify_exact(spec: ExactVerifier, reply: str, expected: str) -> Verdict:
    given = final_answer(reply)
    same = normalize(given) == normalize(expected) if spec.normalize else given == expected
    if same:
        return _binary(True, "The final answer is correct.")
    if not given:
        return _binary(False, "The reply gives no final answer.")
    return _binary(False, f"The final answer {given!r} is not correct.")


# --- math ---------------------------------------------------------------------------------------


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread;
    # elsewhere (e.g. a thread pool in a rollout worker) run without a timeout.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _verify_math(reply: str, expected: str) -> Verdict:
    from math_verify import parse
    from math_verify import verify as math_equal

    timeout = _math_timeout()
    try:
        # Boxing the gold makes bare LaTeX ("\frac{1}{2}", "x+1") parse as one expression.
        gold = parse(f"\\boxed{{{expected}}}", parsing_timeout=timeout)
        predicted = parse(reply, parsing_timeout=timeout)
        if not gold:
            return _binary(False, f"The expected answer {expected!r} could not be parsed as math.")
        if not predicted:
            return _binary(False, "The reply's answer could not be parsed as a mathematical expression.")
        if math_equal(gold, predicted, timeout_seconds=timeout):
            return _binary(True, "The final answer is correct.")
    except Exception as err:  # math-verify can fail on odd input; a reply must never crash scoring
        return _binary(False, f"The reply's answer could not be checked ({type(err).__name__}).")
    return _binary(False, f"The final answer {str(predicted[-1])!r} is not correct.")


# --- reasoning-gym --------------------------------------------------------------------------------


@functools.cache
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _verify_reasoning_gym(spec: ReasoningGymVerifier, reply: str) -> Verdict:
    """Passed only at a full score (>= 1.0): many tasks give partial credit to near misses.

    The answer is the last ``<answer>...</answer>`` span (reasoning-gym's
    convention), else :func:`final_answer`.
    """
    tagged = _ANSWER_TAG.findall(reply)
    answer = tagged[-1].strip() if tagged else final_answer(reply)
    if not answer:
        return Verdict(False, 0.0, "The reply gives no final answer; put it between <answer> and </answer>.")
    try:
        score = float(_scorer(spec.task)(answer, jsonsafe.decode(spec.entry)))
    except Exception as err:  # task scorers may choke on malformed answers
        return Verdict(False, 0.0, f"The answer could not be scored ({type(err).__name__}).")
    if score >= 1.0:
        return Verdict(True, score, "The answer is correct.")
    return Verdict(False, score, f"The answer {answer!r} is not correct (score {score:.2f}).")


# --- what a majority vote compares ------------------------------------------------------------------


def answer_of(spec: VerifierSpec, reply: str) -> str | None:
    """The final answer a verifier checks, normalised (``None`` for a rule verifier, which
    checks the whole reply: its replies have no answer to agree on). Used by maj@k."""
    if isinstance(spec, RegexVerifier):
        return None
    if isinstance(spec, ReasoningGymVerifier):
        tagged = _ANSWER_TAG.findall(reply)
        return normalize(tagged[-1] if tagged else final_answer(reply))
    return normalize(final_answer(reply))
