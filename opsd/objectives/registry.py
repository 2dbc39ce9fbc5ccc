"""The objective registry: one entry per ``train.objective``, the only place its name is tested.

Each entry says what the loss needs, so the config, the training loss and the train stage ask the
entry instead of comparing strings:

* ``divergence`` — the per-token loss on one chunk of ``C`` response positions,
  ``(loss_C, div_C)`` (``None`` for ``none``: reward terms only);
* ``live_teacher`` — the teacher's full distribution is computed during training (from its
  stored context ids) instead of read from the cached top-k targets;
* ``full_rows`` — the student's full ``[C, V]`` log-softmax is needed (otherwise a few gathered
  ids per token: the sampled token, the teacher's top-k, the student's own top-k);
* ``sampled`` — the loss reads the sampled token only (TIP and entropy weights then rank tokens by
  the reverse KL on the teacher's top-k + tail instead of the loss's own divergence);
* ``temperature_free`` — the loss does not compare two tempered distributions (``nll``);
* ``advantage`` — the loss is a policy gradient with advantage ``A_t`` that
  ``train.advantage`` (reward scale λ, vOPD baseline) reshapes.

Formulas (per response token t; sg = stop-gradient; see :mod:`opsd.objectives.divergences`):

    forward_kl_topk     Σ_{k ∪ tail} p_T log(p_T / p_S)        cached teacher top-k (+ tail bucket)
    reverse_kl_topk     Σ_{k ∪ tail} p_S log(p_S / p_T)
    reverse_kl_sampled  −sg(log πT(y_t) − log πS(y_t)) · log πS(y_t)    (REINFORCE form)
    jsd                 JSD_β(πT ‖ πS) over the full vocabulary       live teacher
    nll                 −log πS(y_t)                                  (SFT on the rollouts)
    none                no divergence: reward / routing terms only

With ``divergence.topk_support: student`` the two top-k objectives take the student's own top-k
as the support and score the teacher there, live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from opsd.objectives import divergences as D

# (cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C, inplace) -> (loss_C, div_C)
DivergenceFn = Callable[..., tuple[Any, Any]]


def _topk(forward: bool) -> DivergenceFn:
    fn = D.forward_kl_topk_gathered if forward else D.reverse_kl_topk_gathered

    def divergence(cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C,
                   inplace=False):
        d = cfg.divergence
        if d.topk_support == "student":  # the student's top-k, the live teacher scored there
            s_CK, t_CK, tail = rows.student_CK, t_logp_CV.gather(-1, rows.student_ids_CK), None
        else:
            s_CK, t_CK, tail = rows.topk_CK, topk_logp_CK, tail_C
        return fn(s_CK, t_CK, tail, tail=d.topk_tail, clip=d.clip, clip_mode=d.clip_mode)

    return divergence


def _reverse_kl_sampled(cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C,
                        inplace=False, reference_C=None):
    baseline_C = None
    if cfg.advantage.baseline == "vopd":
        # V_t = -KL(pS||pT) on the teacher's top-k + tail (detached)
        baseline_C = -D.reverse_kl_topk_gathered(rows.topk_CK.detach(), topk_logp_CK, tail_C)[0]
    return D.reverse_kl_sampled_gathered(rows.token_C, teacher_C, behaviour_C,
                                         cfg.importance_ratio_clip,
                                         reward_scale=cfg.advantage.reward_scale,
                                         baseline_N=baseline_C, clip=cfg.divergence.clip,
                                         reference_logp_N=reference_C)


def _jsd(cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C, inplace=False):
    d = cfg.divergence
    # inplace: the chunk's teacher block is recomputed per chunk and read by nothing else
    return D.generalized_jsd(rows.full_CV, t_logp_CV, d.jsd_beta, clip=d.clip,
                             clip_mode=d.clip_mode, inplace=inplace)


def _nll(cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C, inplace=False):
    return -rows.token_C, -rows.token_C.detach()


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    divergence: DivergenceFn | None
    live_teacher: bool = False
    full_rows: bool = False
    sampled: bool = False
    topk_support: bool = False  # divergence.topk_support=student applies (and makes it live)
    temperature_free: bool = False
    # advantage.reward_scale / advantage.baseline shape its A_t; its divergence takes
    # reference_C (G-OPD's pRef, teacher.reference) as a keyword
    advantage: bool = False

    def needs_live_teacher(self, cfg) -> bool:
        """True when the teacher's logits are computed during training for ``cfg`` (a TrainConfig)."""
        return self.live_teacher or (self.topk_support and cfg.divergence.topk_support == "student")

    def student_support(self, cfg) -> bool:
        return self.topk_support and cfg.divergence.topk_support == "student"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("forward_kl_topk", "forward KL on the teacher's cached top-k + a tail bucket",
              _topk(forward=True), topk_support=True),
    Objective("reverse_kl_sampled", "sampled-token reverse KL, REINFORCE form (cached targets)",
              _reverse_kl_sampled, sampled=True, advantage=True),
    Objective("reverse_kl_topk", "reverse KL on the teacher's cached top-k + a tail bucket",
              _topk(forward=False), topk_support=True),
    Objective("jsd", "generalized JSD(beta) over the full vocabulary against a live teacher",
              _jsd, live_teacher=True, full_rows=True),
    Objective("nll", "negative log-likelihood of the rollouts (SFT)", _nll, sampled=True,
              temperature_free=True),
    Objective("none", "no divergence: reward / routing terms only", None, sampled=True),
)}

NAMES = tuple(OBJECTIVES)


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(NAMES)}") from None
