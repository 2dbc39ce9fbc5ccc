"""BRTS: which of a prompt's teacher replies becomes a training sample (Zhang et al. 2026,
*On-Policy Distillation with Best-of-N Teacher Rollout Selection*, arXiv:2605.09725).

The teacher samples a small pool of replies per prompt; one is kept by a priority rule,
correctness first, student alignment second. With ``passed_i`` the verifier's verdict and
``ℓ_i = (1/|y_i|) Σ_t log πS(y_i,t | x, y_i,<t)`` the student's mean per-token log-likelihood of
reply ``i`` (no privileged context: the most student-likely reply is the least off-policy),
the tiers are tried in order:

1. some tier-1 reply (the teacher's own context) passes: ``argmax_{i: passed_i} ℓ_i``;
2. recovery — none passes, so the teacher, shown the ground truth as well, samples again:
   ``argmax_{j: passed_j} ℓ_j`` over those replies;
3. still none: ``argmax_i ℓ_i`` over tier 1 (``fallback: most_likely``, no correctness
   guarantee) or nothing (``skip``).

Ties in ``ℓ`` keep the earlier sample (a stable order, so a rerun picks the same reply). The
paper measures alignment as the share of the teacher's tokens inside the student's top-K at the
same position; opsd scores the reply under the student itself, which needs no position
alignment between two different replies (docs/recipes.md lists this simplification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    """One sampled teacher reply: its tier (1 own context, 2 recovery), verdict and ``ℓ``."""

    tier: int
    passed: bool
    student_logp: float  # mean per-token log-likelihood under the student


@dataclass(frozen=True)
class Choice:
    tier: int  # 1, 2, 3; 0 when nothing is kept
    index: int | None  # into the candidates as given (tier 1 first, then tier 2)
    reason: str


def _best(cands: Sequence[Candidate], idx: Sequence[int]) -> int:
    # max keeps the first of equal keys: the earlier sample wins a tie
    return max(idx, key=lambda i: cands[i].student_logp if math.isfinite(cands[i].student_logp)
               else -math.inf)


def choose(cands: Sequence[Candidate], fallback: str = "most_likely") -> Choice:
    """The BRTS choice among ``cands`` (tier-1 candidates first, then any tier-2 ones)."""
    t1 = [i for i, c in enumerate(cands) if c.tier == 1]
    t2 = [i for i, c in enumerate(cands) if c.tier == 2]
    for tier, pool in ((1, t1), (2, t2)):
        ok = [i for i in pool if cands[i].passed]
        if ok:
            i = _best(cands, ok)
            where = "teacher" if tier == 1 else "recovery (ground truth shown)"
            return Choice(tier, i, f"{len(ok)} of {len(pool)} {where} replies passed; kept the most "
                                   f"student-likely of them (mean log-lik {cands[i].student_logp:.3f})")
    tried = f"none of {len(t1)} teacher replies" + (f" nor {len(t2)} recovery replies" if t2 else "")
    if fallback == "skip" or not t1:
        return Choice(0, None, f"{tried} passed; none kept (fallback: skip)")
    i = _best(cands, t1)
    return Choice(3, i, f"{tried} passed; kept the most student-likely teacher reply "
                        f"(mean log-lik {cands[i].student_logp:.3f}, not verified correct)")
