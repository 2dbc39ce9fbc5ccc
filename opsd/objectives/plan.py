"""Per-token loss coefficients: what each token of a micro-batch is trained with, and how much.

Every token's loss is a weighted sum of four terms (``sg`` = stop-gradient)::

    loss_t = distill_t · D_t            the configured divergence (train.objective)
           + fkl_t     · FKL_t          top-k forward KL (TRACE key spans)
           + rkl_t     · RKL_t          top-k reverse KL (TRACE error spans)
           + pg_t      · (-ρ_t log πS(y_t))   reward term: GRPO advantage, SCOPE MLE weight

and the optimiser step minimises ``Σ_t loss_t / (tokens in the batch)``. This module only
decides the detached coefficients (weighting, selection, routing, annealing); the loop
evaluates the terms chunk by chunk. ``ρ_t`` is the clipped importance ratio
``πS/πbehaviour`` when ``train.importance_ratio_clip`` is set, else 1.

With ``rewards.credit: cepo`` the reward coefficient of a token is ``rl_weight · Â_t``, CEPO's
contrast-weighted advantage (:func:`opsd.objectives.mixing.cepo_credit`); a reply the teacher
wrote (BRTS, ``rollout.brts``) has its distillation coefficient scaled by
``weighting.teacher_reply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opsd.config import TrainConfig
from opsd.objectives import divergences as D
from opsd.objectives import mixing as M
from opsd.objectives import registry
from opsd.objectives import weighting as W


@dataclass
class TokenStats:
    """Detached per-token statistics of the *current* student (a no-grad pass before the loss)."""

    student_entropy_N: torch.Tensor
    div_N: torch.Tensor  # the configured divergence's value (what TIP ranks by)
    teacher_entropy_N: torch.Tensor | None = None  # exact, with a live teacher


@dataclass
class Coefficients:
    distill_N: torch.Tensor | None = None
    fkl_N: torch.Tensor | None = None
    rkl_N: torch.Tensor | None = None
    pg_N: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)


def needs_stats(cfg: TrainConfig) -> bool:
    """True when the coefficients depend on the current student (an extra no-grad logits pass)."""
    return (
        cfg.selection.mode == "tip"
        or cfg.weighting.entropy == "student"
        or (cfg.weighting.entropy == "teacher" and cfg.live_teacher)
    )


def _nonzero_or_none(x_N: torch.Tensor | None) -> torch.Tensor | None:
    if x_N is None or not bool((x_N != 0).any()):
        return None
    return x_N.float()


def token_coefficients(batch, cfg: TrainConfig, stats: TokenStats | None = None,
                       progress: float = 0.0) -> Coefficients:
    """Coefficients for every token of ``batch`` (a :class:`opsd.training.batches.Batch`).

    ``progress`` = finished optimiser steps / planned steps (TRACE's KL annealing).
    """
    n = batch.n_tokens
    r = cfg.rewards
    seq_N, tokpos_N = batch.seq_N, batch.tokpos_N
    adv_N = batch.advantage_N if batch.advantage_N is not None else torch.zeros(n)
    passed_N = batch.passed_N if batch.passed_N is not None else torch.zeros(n, dtype=torch.bool)
    info: dict[str, float] = {}

    if cfg.trace.enabled:
        # TRACE: forward KL on key spans of passing replies, reverse KL on error spans of failing
        # ones, GRPO on every other token; the KL channel is annealed away.
        t = cfg.trace
        klw = M.anneal(progress, t.kl_weight, t.warmup_fraction, t.decay_fraction)
        key_N = (batch.key_N if batch.key_N is not None else torch.zeros(n, dtype=torch.bool)) & passed_N
        err_N = (batch.error_N if batch.error_N is not None else torch.zeros(n, dtype=torch.bool)) & ~passed_N
        other_N = ~(key_N | err_N)
        info.update(kl_weight=klw, key_fraction=float(key_N.float().mean()) if n else 0.0,
                    error_fraction=float(err_N.float().mean()) if n else 0.0)
        pg_N = r.rl_weight * adv_N * other_N
        return Coefficients(fkl_N=_nonzero_or_none(klw * key_N.float()),
                            rkl_N=_nonzero_or_none(klw * err_N.float()),
                            pg_N=_nonzero_or_none(pg_N), info=info)

    w = cfg.weighting
    weight_N = torch.ones(n)
    if w.position in ("linear", "sigmoid"):
        pw_N = W.position_weights(tokpos_N, batch.resp_len_N, w.position, w.position_min,
                                  w.position_tau, w.position_scale)
        weight_N = weight_N * (W.normalize_per_sequence(pw_N, seq_N) if w.normalize else pw_N)
    elif w.position == "iw_opd":
        abs_adv_N = (batch.teacher_logp_N - batch.behaviour_logp_N).abs()
        pw_N = W.iw_opd_weights(abs_adv_N, seq_N, tokpos_N, w.iw_gamma)
        weight_N = weight_N * (W.normalize_per_sequence(pw_N, seq_N) if w.normalize else pw_N)
    if w.skip_first:
        weight_N = weight_N * W.skip_first(tokpos_N, w.skip_first)
    if batch.sample_weight_N is not None:  # BRTS: the teacher-context branch's lambda
        weight_N = weight_N * batch.sample_weight_N

    active_N = torch.ones(n, dtype=torch.bool)  # tokens that receive the distillation term
    pg_N = None
    if r.routing == "srpo":
        # SRPO: passed replies → GRPO, failed → distillation (entropy-weighted via weighting.entropy).
        active_N = ~passed_N
        pg_N = r.rl_weight * adv_N * passed_N
    elif r.routing == "kepo":
        # KEPO: quality-gated distillation (passed replies only), GRPO on every reply.
        active_N = passed_N
        pg_N = r.rl_weight * adv_N
    elif r.routing == "scope":
        # SCOPE: failed → KL × teacher-perplexity weight; passed → MLE × student-perplexity weight.
        active_N = ~passed_N
        weight_N = weight_N * batch.scope_weight_N
        pg_N = r.rl_weight * batch.scope_weight_N * passed_N
    elif r.rl_weight > 0:
        pg_N = r.rl_weight * adv_N
    if r.credit == "cepo" and pg_N is not None:
        # CEPO: the contrast of the right- and wrong-answer teachers scales each token's share
        # of the (sign-preserving) advantage
        lam = M.cepo_lambda(progress, r.cepo_lambda, r.cepo_decay_fraction)
        credit_N = M.cepo_credit(adv_N, batch.teacher_logp_N - batch.negative_logp_N, lam,
                                 r.cepo_clip)
        pg_N = pg_N * credit_N
        info.update(cepo_lambda=lam, cepo_credit_mean=float(credit_N.mean()) if n else 1.0)

    if w.entropy != "none":
        if w.entropy == "student":
            h_N = stats.student_entropy_N
        elif stats is not None and stats.teacher_entropy_N is not None:
            h_N = stats.teacher_entropy_N
        else:
            h_N = D.teacher_entropy_topk(batch.topk_logp_NK, batch.tail_N)
        weight_N = weight_N * W.entropy_weights(h_N, w.entropy_tau, active_N & (weight_N > 0))

    if cfg.selection.mode == "tip":
        s = cfg.selection
        keep_N = W.tip_select(stats.student_entropy_N, stats.div_N, s.entropy_fraction,
                              s.divergence_fraction)
        info["selected_fraction"] = float(keep_N.float().mean()) if n else 0.0
        weight_N = weight_N * W.selection_weights(keep_N)

    distill_N = None
    if registry.get(cfg.objective).divergence is not None:
        distill_N = r.distill_weight * weight_N * active_N
    info["distill_fraction"] = float((distill_N > 0).float().mean()) if distill_N is not None and n else 0.0
    info["pg_fraction"] = float((pg_N != 0).float().mean()) if pg_N is not None and n else 0.0
    return Coefficients(distill_N=_nonzero_or_none(distill_N), pg_N=_nonzero_or_none(pg_N), info=info)
