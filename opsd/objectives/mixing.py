"""Mixing distillation with verifier rewards: group advantages, correctness routing, spans.

Per-sample quantities are computed once over all samples of a rollout artifact
(a group — the samples of one dataset row — may fall into different optimiser
batches); per-token coefficients are built from them by
:mod:`opsd.objectives.plan`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch


def group_advantages(rewards: Sequence[float], groups: Sequence[str], eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + ε)``
    over the group ``g`` of sample ``i`` (the samples of one prompt), with the unbiased std as
    in TRL's ``GRPOTrainer``. A group of one sample, or of equal rewards, gives 0."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(r)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    for idx in members.values():
        if len(idx) < 2:
            continue
        rg = r[idx]
        std = rg.std(ddof=1)
        if std > 0:  # equal rewards carry no preference (TRL: 0 / (0 + eps) = 0)
            out[idx] = (rg - rg.mean()) / (std + eps)
    return out


def sequence_log_ppl(logp_R: np.ndarray) -> float:
    """``log PPL = -mean_t log p(y_t)`` of one reply (0 for an empty reply)."""
    logp_R = np.asarray(logp_R, dtype=np.float64)
    return float(-logp_R.mean()) if logp_R.size else 0.0


def group_softmax_weights(
    scores: Sequence[float], groups: Sequence[str], active: Sequence[bool], tau: float = 1.0
) -> np.ndarray:
    """SCOPE's group-level normalisation (Zheng et al. 2026, arXiv:2604.10688): within each group,
    the active samples get ``w_i = n_active · softmax_i(score_i / τ)`` (mean 1 per group); the
    others 0. Calibrates weights to each prompt's own difficulty."""
    s = np.asarray(scores, dtype=np.float64)
    act = np.asarray(active, dtype=bool)
    out = np.zeros_like(s)
    members: dict[str, list[int]] = defaultdict(list)
    for i, (g, a) in enumerate(zip(groups, act)):
        if a:
            members[g].append(i)
    for idx in members.values():
        z = s[idx] / tau
        z = np.exp(z - z.max())
        out[idx] = len(idx) * z / z.sum()
    return out


def scope_weights(
    log_ppl_teacher: Sequence[float],
    log_ppl_student: Sequence[float],
    passed: Sequence[bool | None],
    groups: Sequence[str],
    tau: float = 1.0,
) -> np.ndarray:
    """SCOPE per-sample weights (Zheng et al. 2026): failed replies → KL distillation weighted by
    ``softmax(-log PPL_T / τ)`` within the group (the teacher finds the reply's continuation
    predictable: its guidance there is reliable); passed replies → MLE weighted by
    ``softmax(log PPL_S / τ)`` (low-confidence correct replies at the capability boundary count
    more). Unknown verdicts (no verifier) are treated as failed."""
    ok = np.asarray([bool(p) for p in passed])
    w_fail = group_softmax_weights(-np.asarray(log_ppl_teacher), groups, ~ok, tau)
    w_pass = group_softmax_weights(np.asarray(log_ppl_student), groups, ok, tau)
    return np.where(ok, w_pass, w_fail)


def anneal(progress: float, weight: float, warmup_fraction: float, decay_fraction: float) -> float:
    """TRACE's KL weight schedule (Wang et al. 2026, arXiv:2605.10194): ``weight`` for the first
    ``warmup_fraction`` of training, then linearly to 0 over ``decay_fraction``, then 0.
    ``progress`` = finished optimiser steps / total steps."""
    if progress < warmup_fraction:
        return weight
    if decay_fraction <= 0:
        return 0.0
    return weight * max(0.0, 1.0 - (progress - warmup_fraction) / decay_fraction)


def cepo_lambda(progress: float, lambda0: float, decay_fraction: float | None) -> float:
    """CEPO's evidence weight schedule (Heakl et al. 2026, arXiv:2605.19436): ``λ0`` falling
    linearly to 0 over the first ``decay_fraction`` of training (the paper: over 25 of 50 steps),
    then 0 — dense credit early, plain GRPO after. ``None``: ``λ0`` throughout."""
    if decay_fraction is None:
        return lambda0
    return lambda0 * max(0.0, 1.0 - progress / decay_fraction)


def cepo_credit(adv_N: torch.Tensor, contrast_N: torch.Tensor, lam: float,
                eps_w: float) -> torch.Tensor:
    """CEPO's token credit (Heakl et al. 2026, arXiv:2605.19436), the factor on GRPO's advantage::

        Â_t = A_i · [(1 − λ) + λ · clip(w_t, 1 − ε_w, 1 + ε_w)],   w_t = exp(sign(A_i) · c_t)

    with ``c_t = sg(log pT+(y_t) − log pT−(y_t))`` the contrast between the teacher shown the
    ground truth and the teacher shown a rejected reply. Returns ``Â_t / A_i`` (1 where
    ``A_i = 0``: sign 0 gives w = 1). A token the right answer favours and the wrong one
    disfavours (c > 0) gets more credit in a passing reply and less blame in a failing one;
    filler (c ≈ 0) keeps GRPO's uniform weight. The direction stays the verifier's: the factor
    is positive."""
    w_N = torch.exp(torch.sign(adv_N) * contrast_N.detach())
    return (1.0 - lam) + lam * w_N.clamp(1.0 - eps_w, 1.0 + eps_w)


# ----------------------------------------------------------------------------- spans


def char_spans(text: str, patterns: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of every non-empty match of every regex in ``text``."""
    spans = []
    for pat in patterns:
        for m in re.finditer(pat, text):
            if m.end() > m.start():
                spans.append((m.start(), m.end()))
    return spans


def token_char_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range of each token inside ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Computed from the decoded lengths of growing prefixes, so byte-level tokens that only form a
    character together still map onto the text that was verified (never re-tokenised)."""
    offsets, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True))
        offsets.append((prev, max(prev, n)))
        prev = max(prev, n)
    return offsets


def spans_to_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """True for each token whose character range overlaps a span."""
    mask = np.zeros(len(offsets), dtype=bool)
    for i, (a, b) in enumerate(offsets):
        for s, e in spans:
            if a < e and s < b:
                mask[i] = True
                break
    return mask


def row_span_patterns(row, key_patterns: Sequence[str], error_patterns: Sequence[str],
                      key_from_verifier: bool) -> tuple[list[str], list[str]]:
    """The regexes marking key and error spans for one dataset row.

    Row field (TRACE span annotation): ``metadata.trace = {"key": [regex, ...],
    "error": [regex, ...]}``, added to the run's ``train.trace.key_patterns`` /
    ``error_patterns``; with ``key_from_verifier`` a regex verifier's own pattern marks a key
    span too (the tokens that made the reply pass)."""
    key, err = list(key_patterns), list(error_patterns)
    meta = (getattr(row, "metadata", None) or {}).get("trace") or {}
    key += list(meta.get("key", []))
    err += list(meta.get("error", []))
    if key_from_verifier and row is not None:
        v = getattr(row, "verifier", None)
        if v is not None and getattr(v, "type", None) == "regex":
            key.append(f"(?{v.flags}){v.pattern}" if v.flags else v.pattern)
    return key, err
