"""Evaluation metrics over k sampled replies per prompt.

* ``avg@k``  — mean pass rate over all k samples (expected single-sample accuracy);
* ``pass@k`` — unbiased estimator of P(at least one of k passes) (Chen et al. 2021),
  computed from n ≥ k samples: ``1 - C(n - c, k) / C(n, k)``;
* ``maj@k``  — the majority answer is correct: replies are grouped by the final
  answer their verifier extracts (:func:`opsd.data.verifiers.answer_of`); a rule
  verifier extracts none, so its replies vote with their verdicts. The most
  frequent group's verdict counts; ties go to the earliest sample.

Calibration of a confidence the reply states ("Confidence: 0.8", "confidence: 80%"; CaOPD,
Zhang et al. 2026, arXiv:2604.16830), over the greedy replies that state one, with ``c_i`` the
stated confidence and ``y_i`` ∈ {0, 1} the verdict:

* Brier score ``(1/n) Σ_i (c_i − y_i)²``;
* ECE over ``M`` equal-width bins ``B_m`` of [0, 1] (a confidence of 1 in the last):
  ``Σ_m (|B_m| / n) · |mean_{B_m} y − mean_{B_m} c|``.
"""

from __future__ import annotations

import re
from collections import Counter
from math import comb
from typing import Sequence

_CONFIDENCE = re.compile(r"confidence(?:\s+(?:level|score))?\s*(?:is|[:=])?\s*(\d{1,3}(?:\.\d+)?)\s*(%?)",
                         re.IGNORECASE)


def stated_confidence(text: str) -> float | None:
    """The last confidence a reply states, as a probability: "Confidence: 0.8" → 0.8,
    "confidence: 80%" or "Confidence: 80" → 0.8; None when it states none (or one above 100 %)."""
    found = _CONFIDENCE.findall(text)
    if not found:
        return None
    number, percent = found[-1]
    value = float(number)
    if percent or value > 1.0:
        value /= 100.0
    return value if 0.0 <= value <= 1.0 else None


def confidence_spans(text: str) -> list[tuple[int, int]]:
    """The character spans of every confidence statement :func:`stated_confidence` would read
    (the same pattern, so what CaOPD's revision strips is what evaluation parses)."""
    return [m.span() for m in _CONFIDENCE.finditer(text)]


def brier(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    return sum((c - float(y)) ** 2 for c, y in zip(confidence, correct)) / len(confidence)


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, y in zip(confidence, correct):
        groups.setdefault(min(int(c * bins), bins - 1), []).append((c, y))
    n = len(confidence)
    return sum(len(g) / n * abs(sum(y for _, y in g) / len(g) - sum(c for c, _ in g) / len(g))
               for g in groups.values())


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def vote(answer: str | None, passed: bool) -> str:
    """A reply's ballot in maj@k: its extracted answer, or its verdict when there is none."""
    return f"answer:{answer}" if answer is not None else f"verdict:{bool(passed)}"


def majority_passed(answers: Sequence[str], passed: Sequence[bool]) -> bool:
    counts = Counter(answers)
    best = max(counts.values())
    for a, p in zip(answers, passed):  # earliest sample of a most frequent answer
        if counts[a] == best:
            return bool(p)
    return False


def macro(values: dict[str, float]) -> float:
    """Unweighted mean over tasks: each rule/task counts the same."""
    return sum(values.values()) / len(values) if values else float("nan")


def trend(values: Sequence[float], *, tail: float = 0.5) -> float:
    """Relative change of a curve over its last ``tail`` fraction: the least-squares line through
    those points, ``(fit(last) − fit(first)) / |fit(first)|``. −0.2: the quantity fell by a fifth
    of where the window started (a loss still falling); ~0: flat; a positive loss falling
    towards 0 gives at least −1. 0.0 with fewer than 4 points."""
    pts = [float(v) for v in values if v is not None and v == v]
    n = max(4, int(round(len(pts) * tail)))
    pts = pts[-n:]
    if len(pts) < 4:
        return 0.0
    xs = range(len(pts))
    mx, my = (len(pts) - 1) / 2, sum(pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, pts)) / sum((x - mx) ** 2 for x in xs)
    start = my - slope * mx
    return slope * (len(pts) - 1) / max(abs(start), 1e-12)


def still_improving(losses: Sequence[float], *, tail: float = 0.5, min_drop: float = 0.1) -> bool:
    """True when the loss fell by more than ``min_drop`` (relative, :func:`trend`) over the last
    ``tail`` of training: stopping there left progress on the table."""
    return trend(losses, tail=tail) < -min_drop
