"""CaOPD's confidence revision (Zhang et al. 2026, arXiv:2604.16830): calibration-aware targets.

A teacher reading privileged context is sure of itself; a student that imitates it learns to
state that certainty without the evidence. CaOPD replaces the confidence a reply states by the
student's own empirical success rate on the prompt, before the teacher scores the reply and the
student trains on it. For a prompt ``x`` with ``k`` rollouts ``y_1..y_k`` and verdicts
``v_i ∈ {0, 1}`` (the verifier's; rollouts without a verdict do not count):

    P_acc(x) = (1/k) Σ_i v_i

    revise(y_i) = strip(y_i) + sep + "Confidence: " + fmt(P_acc(x))

``strip`` removes every confidence statement the reply makes (the pattern evaluation parses,
:func:`opsd.metrics.confidence_spans`), trailing whitespace after it, then the revised statement is
appended (``sep`` = a newline, none for an empty reply); ``fmt`` writes ``decimals`` digits
(the paper's "Confidence: 0.75"). The reply's verdict stays that of the original attempt: it is
what P_acc counts.

On tokens (:func:`revise_ids`): the reply keeps its longest run of sampled tokens whose text is a
prefix of the revised text; the rest of the revised text is tokenised and a final end token is
kept. The kept prefix's behaviour log-probs stay the sampled ones; the new tokens were never
sampled, so the stage scores them under the sampling policy (stages/confidence.py). The paper's
other two replacements live in the teacher's context: the ``confidence`` view (the note
"The empirical confidence for this question is P_acc ...", opsd.context.builders) and the
confidences demonstrations state (opsd.context.render).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from opsd.metrics import confidence_spans


def pass_rates(row_ids: Sequence[str], passed: Sequence[bool | None]) -> dict[str, float]:
    """P_acc per row: the share of its rollouts that passed (rows with no verdict: absent)."""
    verdicts: dict[str, list[bool]] = defaultdict(list)
    for rid, ok in zip(row_ids, passed):
        if ok is not None:
            verdicts[rid].append(bool(ok))
    return {rid: sum(v) / len(v) for rid, v in verdicts.items()}


def format_confidence(p: float, decimals: int = 2) -> str:
    return f"{p:.{decimals}f}"


def strip_confidence(text: str) -> str:
    """``text`` without any confidence statement, and without trailing whitespace."""
    out, last = [], 0
    for lo, hi in confidence_spans(text):
        out.append(text[last:lo])
        last = hi
    out.append(text[last:])
    return "".join(out).rstrip()


def revise_text(text: str, confidence: str, template: str = "Confidence: {confidence}") -> str:
    """The reply with its stated confidence replaced by (or, stating none, given) ``confidence``
    (P_acc as :func:`format_confidence` writes it)."""
    kept = strip_confidence(text)
    return kept + ("\n" if kept else "") + template.format(confidence=confidence)


def revise_ids(response_ids: Sequence[int], text: str, tokenizer, confidence: str,
               template: str = "Confidence: {confidence}") -> tuple[list[int], int]:
    """(revised response ids, how many leading sampled ids were kept). ``text`` is the reply as
    stored (``response_ids`` decoded without special tokens)."""
    special = set(tokenizer.all_special_ids)
    ids = list(response_ids)
    end = len(ids)
    while end > 0 and ids[end - 1] in special:  # the end token(s) a finished reply stopped on
        end -= 1
    body, tail = ids[:end], ids[end:]
    new_text = revise_text(text, confidence, template)

    def fits(k: int) -> bool:
        return new_text.startswith(tokenizer.decode(body[:k], skip_special_tokens=True))

    # the longest fitting prefix: usually the whole body (no statement to strip); else a binary
    # search (a shorter prefix of a fitting one fits too, up to a split multi-byte character)
    if fits(len(body)):
        k = len(body)
    else:
        lo, hi = 0, len(body) - 1  # fits(lo) holds (the empty prefix), fits(hi + 1) does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        k = lo
    rest = new_text[len(tokenizer.decode(body[:k], skip_special_tokens=True)):]
    return body[:k] + tokenizer.encode(rest, add_special_tokens=False) + tail, k
