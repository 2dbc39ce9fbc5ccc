"""Per-token divergences between teacher and student next-token distributions.

Every function takes the student's log-softmax rows for ``N`` response tokens
(``logp_NV``, float32 or float64, with autograd) and the teacher's side for the
same tokens — cached targets (sampled-token log-prob, top-k ids + log-probs,
tail mass) or, for a live teacher, its own log-softmax rows ``teacher_logp_NV``
(no autograd) — and returns ``(loss_N, div_N)``: a per-token loss to be
weighted and averaged by the caller, and a detached per-token divergence value
for logging, clipping and token selection.

Notation: ``πS`` student, ``πT`` teacher, ``y_t`` the sampled token, ``sg``
stop-gradient, ``K`` a top-k support (the teacher's cached top-k ids or the
student's own), ``rest`` the tail class of mass ``1 - Σ_K p``.

Clipping (OPSD, Zhao et al. 2026, arXiv:2601.18734, code ``jsd_token_clip``):
with ``clip = c`` and ``clip_mode = "element"`` every summand of the divergence
(one per vocabulary entry, or per top-k class) is clamped at ``c`` before the
sum; with ``"token"`` the per-token sum is clamped. A clamped term contributes
no gradient — that is what the clamp does in the reference code, so clipping
mutes exactly the tokens where the teacher disagrees most.
"""

from __future__ import annotations

import math

import torch

_LN2 = math.log(2.0)


_ROWS = 32  # row sub-chunk of the row-wise loops on CPU: a [32, V] temporary at most


def _rows(x: torch.Tensor) -> int:
    """Rows per sub-chunk of the row-wise loops below. On CPU ``_ROWS``: the [rows, V]
    temporaries stay small and cache-resident. On an accelerator the whole block at once: the
    block is already bounded by ``train.logit_chunk``, and 32-row pieces turned one chunk into
    thousands of kernel launches (an H100 spent 80 % of a step's CPU time launching them)."""
    return _ROWS if x.device.type == "cpu" else max(1, x.shape[0])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and near -inf (Mächler 2012).
    ``x`` is kept below ``-eps`` of its dtype (the rest mass of a support that covers
    everything is then ``eps``, not 0: finite logs and gradients)."""
    x = x.clamp(max=-float(torch.finfo(x.dtype).eps))
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def entropy(logp_NV: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``-Σ p log p`` (detached; one temporary block)."""
    with torch.no_grad():
        return -(logp_NV.exp().mul_(logp_NV)).sum(-1)


def coarsen(logp_NK: torch.Tensor, tail: str, log_rest_N: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs on a top-k support as a proper distribution.

    ``tail="tail"``: append the rest class, ``log(1 - Σ_K p)`` (or ``log_rest_N`` when
    given, e.g. a stored tail mass) → ``[N, K+1]``. ``tail="renorm"``: renormalise on the
    support, ``log p_k - log Σ_K p`` → ``[N, K]``.
    """
    if tail == "renorm":
        return logp_NK - torch.logsumexp(logp_NK, dim=-1, keepdim=True)
    if log_rest_N is None:
        log_rest_N = log1mexp(torch.logsumexp(logp_NK, dim=-1))
    return torch.cat([logp_NK, log_rest_N[:, None]], dim=-1)


def _kl_terms(logp_p_NC: torch.Tensor, logp_q_NC: torch.Tensor) -> torch.Tensor:
    """Summands ``p (log p - log q)`` of ``KL(p || q)``; ``0 log 0 = 0``."""
    p_NC = logp_p_NC.exp()
    return torch.where(p_NC > 0, p_NC * (logp_p_NC - logp_q_NC), torch.zeros_like(p_NC))


def _reduce(terms_NC: torch.Tensor, clip: float | None, clip_mode: str) -> torch.Tensor:
    if clip is not None and clip_mode == "element":
        terms_NC = terms_NC.clamp(max=clip)
    loss_N = terms_NC.sum(-1)
    if clip is not None and clip_mode == "token":
        loss_N = loss_N.clamp(max=clip)
    return loss_N


def _teacher_rest(logp_t_NK, tail_N, eps: float, dtype) -> torch.Tensor:
    """The teacher's rest-class log-mass: the stored tail mass (a stored tail below ``eps`` is
    float noise of ``1 - Σ top-k``: an almost empty class), else ``log(1 - Σ_K pT)``."""
    if tail_N is not None:
        return tail_N.to(dtype).clamp_min(eps).log()
    return log1mexp(torch.logsumexp(logp_t_NK, dim=-1))


def forward_kl_topk(
    logp_NV: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    topk_logp_NK: torch.Tensor,
    tail_N: torch.Tensor | None = None,
    eps: float = 1e-8,
    *,
    tail: str = "tail",
    clip: float | None = None,
    clip_mode: str = "element",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k forward KL ``KL(πT || πS)`` on a top-k support (Hinton et al. 2015 on the teacher's
    top-k; the tail bucket as in TRL's SDPO ``add_tail_bucket``).

    ``tail="tail"``: ``loss_t = Σ_{k∈K} pT_k (log pT_k - log pS_k) + pT_rest (log pT_rest -
    log pS_rest)`` with ``pS_rest = 1 - Σ_K pS`` and ``pT_rest = tail_N`` (stored) or
    ``1 - Σ_K pT``. This is the exact KL between the two distributions coarsened to ``k + 1``
    classes: ≥ 0, and equal to the full-vocabulary forward KL when ``K`` covers the vocabulary.
    ``tail="renorm"``: the same sum over ``K`` with both distributions renormalised on ``K``.
    ``topk_logp_NK`` are the teacher's log-probs on ``topk_ids_NK`` (any support). Only
    ``[N, k]`` tensors are built besides the student's ``logp_NV``.
    """
    logp_s_NK = logp_NV.gather(-1, topk_ids_NK.long())
    return forward_kl_topk_gathered(logp_s_NK, topk_logp_NK, tail_N, eps, tail=tail, clip=clip,
                                    clip_mode=clip_mode)


def forward_kl_topk_gathered(logp_s_NK, topk_logp_NK, tail_N=None, eps: float = 1e-8, *,
                             tail: str = "tail", clip=None, clip_mode: str = "element"):
    """:func:`forward_kl_topk` from the student's log-probs already gathered on the support."""
    logp_t_NK = topk_logp_NK.to(logp_s_NK.dtype)
    t_rest = None
    if tail == "tail":
        t_rest = _teacher_rest(logp_t_NK, tail_N, eps, logp_s_NK.dtype)
    p_NC = coarsen(logp_t_NK, tail, t_rest)
    q_NC = coarsen(logp_s_NK, tail)
    terms_NC = _kl_terms(p_NC, q_NC)
    if tail == "tail" and tail_N is not None:
        # An empty teacher rest class contributes nothing (and no gradient to pS_rest).
        keep_NC = torch.ones_like(terms_NC, dtype=torch.bool)
        keep_NC[:, -1] = tail_N > eps
        terms_NC = torch.where(keep_NC, terms_NC, torch.zeros_like(terms_NC))
    loss_N = _reduce(terms_NC, clip, clip_mode)
    return loss_N, loss_N.detach()


def reverse_kl_topk(
    logp_NV: torch.Tensor,
    ids_NK: torch.Tensor,
    teacher_logp_NK: torch.Tensor,
    teacher_tail_N: torch.Tensor | None = None,
    eps: float = 1e-8,
    *,
    tail: str = "tail",
    clip: float | None = None,
    clip_mode: str = "element",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k reverse KL ``KL(πS || πT)`` on a top-k support ``K`` (the teacher's cached top-k,
    or the student's own top-k with a live teacher — SDPO's top-k mode, Hübotter et al. 2026).

    ``tail="tail"``: ``loss_t = Σ_{k∈K} pS_k (log pS_k - log pT_k) + pS_rest (log pS_rest -
    log pT_rest)``, the exact reverse KL of the distributions coarsened to ``k + 1`` classes
    (the full-vocabulary reverse KL when ``K`` is the vocabulary). ``pT_rest`` is the stored
    tail mass when given, else ``1 - Σ_K pT``. ``tail="renorm"``: both renormalised on ``K``.
    Gradients flow through the student's log-probs on ``K`` (and its rest mass) only.
    """
    logp_s_NK = logp_NV.gather(-1, ids_NK.long())
    return reverse_kl_topk_gathered(logp_s_NK, teacher_logp_NK, teacher_tail_N, eps, tail=tail,
                                    clip=clip, clip_mode=clip_mode)


def reverse_kl_topk_gathered(logp_s_NK, teacher_logp_NK, teacher_tail_N=None, eps: float = 1e-8, *,
                             tail: str = "tail", clip=None, clip_mode: str = "element"):
    """:func:`reverse_kl_topk` from the student's log-probs already gathered on the support."""
    logp_t_NK = teacher_logp_NK.to(logp_s_NK.dtype)
    t_rest = None
    if tail == "tail":
        t_rest = _teacher_rest(logp_t_NK, teacher_tail_N, eps, logp_s_NK.dtype)
    p_NC = coarsen(logp_s_NK, tail)
    q_NC = coarsen(logp_t_NK, tail, t_rest)
    loss_N = _reduce(_kl_terms(p_NC, q_NC), clip, clip_mode)
    return loss_N, loss_N.detach()


def _log_mixture(s_NV, t_NV, beta: float) -> torch.Tensor:
    """``log(β T + (1-β) S)`` with one extra block at a time."""
    a = t_NV + math.log(beta)
    b = s_NV + math.log1p(-beta)
    return torch.logaddexp(a, b, out=a)


class _GeneralizedJSD(torch.autograd.Function):
    """JSD(β) per token with a closed-form gradient, so a ``[C, V]`` chunk needs only the
    student's and the teacher's log-prob blocks plus a few transient temporaries (autograd
    through the formula would keep ~8 ``[C, V]`` intermediates alive for the backward).

    With ``S, T`` the student/teacher rows and ``M = βT + (1-β)S``, each vocabulary term
    ``e_v`` depends on ``S_v`` only and ``∂e_v/∂log S_v = (1-β) S_v (log S_v - log M_v)``
    (β = 0: ``-T_v``; β = 1: ``S_v (log S_v - log T_v + 1)``). Clipped terms (element) or
    clipped tokens (token) get no gradient. The gradient is w.r.t. the log-probs; the
    caller's log-softmax carries it to the logits.
    """

    @staticmethod
    def _terms(s_NV, t_NV, beta):
        if beta == 0.0:
            return t_NV.exp() * (t_NV - s_NV)
        if beta == 1.0:
            return s_NV.exp() * (s_NV - t_NV)
        log_m = _log_mixture(s_NV, t_NV, beta)
        e = torch.sub(t_NV, log_m).mul_(t_NV.exp()).mul_(beta)
        log_m.neg_().add_(s_NV).mul_(s_NV.exp())  # reuse the block: S (log S - log M)
        return e.add_(log_m, alpha=1.0 - beta)

    @staticmethod
    def forward(ctx, s_NV, t_NV, beta, clip, clip_mode, inplace=False):
        # Row sub-chunks: the elementwise temporaries are [rows, V], never [N, V] (on CPU).
        parts, r = [], _rows(s_NV)
        for i in range(0, s_NV.shape[0], r):
            terms = _GeneralizedJSD._terms(s_NV[i : i + r], t_NV[i : i + r], beta)
            if clip is not None and clip_mode == "element":
                terms.clamp_(max=clip)
            parts.append(terms.sum(-1))
        loss_N = torch.cat(parts) if parts else s_NV.new_zeros(0)
        if clip is not None and clip_mode == "token":
            loss_N = loss_N.clamp(max=clip)
        ctx.save_for_backward(s_NV, t_NV, loss_N)
        ctx.beta, ctx.clip, ctx.clip_mode, ctx.inplace = beta, clip, clip_mode, inplace
        return loss_N

    @staticmethod
    def backward(ctx, grad_N):
        s_NV, t_NV, loss_N = ctx.saved_tensors
        beta, clip, mode = ctx.beta, ctx.clip, ctx.clip_mode
        # inplace (the training loop): the teacher's block is consumed, the gradient is written
        # into it row chunk by row chunk (each chunk reads its own t rows first) — no third block
        g_NV, r = (t_NV if ctx.inplace else torch.empty_like(s_NV)), _rows(s_NV)
        for i in range(0, s_NV.shape[0], r):
            s, t, g = s_NV[i : i + r], t_NV[i : i + r], g_NV[i : i + r]
            mask = (_GeneralizedJSD._terms(s, t, beta) > clip) \
                if clip is not None and mode == "element" else None
            if beta == 0.0:
                torch.neg(t.exp(), out=g)
            elif beta == 1.0:
                torch.mul(s.exp(), s - t + 1.0, out=g)
            else:
                lm = _log_mixture(s, t, beta).neg_().add_(s)  # log S - log M
                torch.mul(lm.mul_(s.exp()), 1.0 - beta, out=g)
            if mask is not None:
                g.masked_fill_(mask, 0.0)
            g.mul_(grad_N[i : i + r, None])
            if clip is not None and mode == "token":
                g.masked_fill_((loss_N[i : i + r] >= clip)[:, None], 0.0)
        return g_NV, None, None, None, None, None


class _LogSoftmaxRows(torch.autograd.Function):
    """``log_softmax`` whose backward, ``g - softmax · Σ g``, runs a row sub-chunk at a time into
    one output block (autograd's keeps two ``[N, V]`` temporaries)."""

    @staticmethod
    def forward(ctx, z_NV, inplace=False):
        out = z_NV.log_softmax(-1)
        ctx.save_for_backward(out)
        ctx.inplace = inplace
        return out

    @staticmethod
    def backward(ctx, g_NV):
        (s_NV,) = ctx.saved_tensors
        # inplace (the training loop, where the incoming gradient is a block of its own): write
        # the result over it, one row chunk after the other
        out, r = (g_NV if ctx.inplace else torch.empty_like(g_NV)), _rows(g_NV)
        for i in range(0, s_NV.shape[0], r):
            g = g_NV[i : i + r]
            torch.sub(g, s_NV[i : i + r].exp().mul_(g.sum(-1, keepdim=True)), out=out[i : i + r])
        return out, None


def log_softmax_rows(z_NV: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``z.log_softmax(-1)`` with a row-chunked backward (see :class:`_LogSoftmaxRows`);
    ``inplace``: the backward overwrites its incoming gradient (one backward, a private block)."""
    return _LogSoftmaxRows.apply(z_NV, inplace)


def generalized_jsd(
    logp_NV: torch.Tensor,
    teacher_logp_NV: torch.Tensor,
    beta: float = 0.5,
    *,
    clip: float | None = None,
    clip_mode: str = "element",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary generalized Jensen–Shannon divergence JSD(β) of GKD (Agarwal et al. 2024,
    "On-Policy Distillation of Language Models", Eq. 1), for a live teacher.

    ``M = β πT + (1 - β) πS``;  ``JSD(β) = β KL(πT || M) + (1 - β) KL(πS || M)``;
    as in GKD (and TRL's ``generalized_jsd_loss``) the end points are the KLs themselves:
    ``β = 0`` → forward ``KL(πT || πS)``, ``β = 1`` → reverse ``KL(πS || πT)``.
    ``teacher_logp_NV`` carries no gradient. Call it on ``[chunk, V]`` blocks: the gradient
    is closed-form (:class:`_GeneralizedJSD`), so the block's working set stays small;
    :func:`generalized_jsd_reference` is the plain-autograd version it is tested against.
    ``inplace`` (the training loop): the backward writes the gradient into the teacher's block,
    which must then be a block of the caller's own that nothing reads afterwards.
    """
    t_NV = teacher_logp_NV.to(logp_NV.dtype).detach()
    loss_N = _GeneralizedJSD.apply(logp_NV, t_NV, float(beta), clip, clip_mode, inplace)
    return loss_N, loss_N.detach()


def generalized_jsd_reference(logp_NV, teacher_logp_NV, beta=0.5, *, clip=None, clip_mode="element"):
    """JSD(β) by the formula with plain autograd (the reference of :func:`generalized_jsd`)."""
    t_NV = teacher_logp_NV.to(logp_NV.dtype).detach()
    if beta == 0.0:
        terms_NV = _kl_terms(t_NV, logp_NV)
    elif beta == 1.0:
        terms_NV = _kl_terms(logp_NV, t_NV)
    else:
        log_m_NV = torch.logaddexp(t_NV + math.log(beta), logp_NV + math.log1p(-beta))
        terms_NV = beta * _kl_terms(t_NV, log_m_NV) + (1.0 - beta) * _kl_terms(logp_NV, log_m_NV)
    return _reduce(terms_NV, clip, clip_mode)


def reverse_kl_sampled(
    logp_NV: torch.Tensor,
    token_N: torch.Tensor,
    teacher_logp_N: torch.Tensor,
    behaviour_logp_N: torch.Tensor | None = None,
    ratio_clip: float | None = None,
    *,
    reward_scale: float = 1.0,
    baseline_N: torch.Tensor | None = None,
    clip: float | None = None,
    reference_logp_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token reverse KL in REINFORCE form (on-policy distillation: Agarwal et al. 2024;
    Lu & Thinking Machines 2025), with the G-OPD/ExOPD reward scale and the vOPD baseline.

    ``A_t = sg(λ (log πT(y_t) - log πRef(y_t)) - (log πS(y_t) - log πRef(y_t)) - b_t)``,
    ``loss_t = -w_t · A_t · log πS(y_t)``.

    - ``λ = reward_scale`` (Yang et al. 2026, arXiv:2602.12125): 1 is plain OPD,
      ``A_t = sg(log πT - log πS)``; λ > 1 extrapolates the teacher's implicit reward
      (ExOPD). ``πRef`` is ``reference_logp_N`` when given (G-OPD's reference model, e.g. the
      teacher's pre-RL base: ``teacher.reference``), else the behaviour policy
      (``behaviour_logp_N``; the initial student in offline mode); needed only when λ ≠ 1.
    - ``b_t = baseline_N`` (vOPD, Oh et al. 2026, arXiv:2605.07865): the detached value
      ``V_t = -KL(πS || πT)_t``; subtracting it keeps the gradient unbiased and lowers variance.
    - ``w_t = clip(πS(y_t)/πbehaviour(y_t), 1/c, c)`` (detached) with ``ratio_clip = c`` for
      stale samples; otherwise 1.
    - ``clip``: the advantage is clamped to ``[-clip, clip]`` (per-token clipping).

    With ``y_t ~ πS`` and λ = 1 the gradient is an unbiased estimate of ``∇ KL(πS || πT)``.
    ``div_t = log πS(y_t) - log πT(y_t)`` is the per-token k1 estimate of the reverse KL.
    """
    logp_s_N = logp_NV.gather(-1, token_N[:, None]).squeeze(-1)
    return reverse_kl_sampled_gathered(logp_s_N, teacher_logp_N, behaviour_logp_N, ratio_clip,
                                       reward_scale=reward_scale, baseline_N=baseline_N, clip=clip,
                                       reference_logp_N=reference_logp_N)


def reverse_kl_sampled_gathered(logp_s_N, teacher_logp_N, behaviour_logp_N=None, ratio_clip=None, *,
                                reward_scale: float = 1.0, baseline_N=None, clip=None,
                                reference_logp_N=None):
    """:func:`reverse_kl_sampled` from the student's log-prob of the sampled tokens ``[N]``."""
    lp_s_N = logp_s_N.detach()
    teacher_N = teacher_logp_N.to(logp_s_N.dtype)
    if reward_scale != 1.0:
        ref_N = reference_logp_N if reference_logp_N is not None else behaviour_logp_N
        if ref_N is None:
            raise ValueError("reward_scale != 1 needs the reference (or behaviour) log-probs")
        ref_N = ref_N.to(logp_s_N.dtype)
        advantage_N = reward_scale * (teacher_N - ref_N) - (lp_s_N - ref_N)
    else:
        advantage_N = teacher_N - lp_s_N
    if baseline_N is not None:
        advantage_N = advantage_N - baseline_N.to(logp_s_N.dtype).detach()
    if clip is not None:
        advantage_N = advantage_N.clamp(-clip, clip)
    # the same REINFORCE form as the reward term (ratio weight detached)
    loss_N = policy_gradient(logp_s_N, behaviour_logp_N, advantage_N.detach(),
                             ratio_clip=ratio_clip if behaviour_logp_N is not None else None)
    return loss_N, (lp_s_N - teacher_N).detach()


def policy_gradient(logp_N: torch.Tensor, behaviour_logp_N: torch.Tensor, adv_N: torch.Tensor, *,
                    ppo_clip: float | None = None, ratio_clip: float | None = None) -> torch.Tensor:
    """Per-token reward-term loss for sampled tokens ``y_t`` with advantages ``A_t``.

    * ``ppo_clip = ε``: PPO's clipped surrogate as in GRPO (Schulman et al. 2017; Shao et al.
      2024), ``loss_t = -min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t)``, ``ρ_t = πS(y_t)/πb(y_t)``:
      the gradient is ``-A_t ρ_t ∇log πS`` inside the band and 0 once ``ρ_t`` left it in the
      direction ``A_t`` favours — how far one batch of samples can move a token is bounded.
    * otherwise REINFORCE, ``loss_t = -A_t · w_t · log πS(y_t)`` with the detached weight
      ``w_t = clip(sg(ρ_t), 1/c, c)`` when ``ratio_clip = c`` is set, else ``w_t = 1``.

    ``adv_N`` may carry non-negative per-token weights (rl_weight, routing masks); only its
    sign enters the clipping."""
    if ppo_clip is not None:
        ratio_N = (logp_N - behaviour_logp_N).exp()
        return -torch.minimum(ratio_N * adv_N, ratio_N.clamp(1.0 - ppo_clip, 1.0 + ppo_clip) * adv_N)
    if ratio_clip is not None:
        adv_N = adv_N * (logp_N.detach() - behaviour_logp_N).exp().clamp(1.0 / ratio_clip, ratio_clip)
    return -adv_N * logp_N


def sampled_nll(logp_NV: torch.Tensor, token_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of the stored tokens, ``loss_t = -log πS(y_t)`` (SFT; also the
    MLE term of SCOPE and the policy-gradient term ``-A log πS(y_t)`` once weighted by ``A``)."""
    loss_N = -logp_NV.gather(-1, token_N[:, None]).squeeze(-1)
    return loss_N, loss_N.detach()


def _rowwise_logsumexp(z_NV: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        r = _rows(z_NV)
        return torch.cat([torch.logsumexp(z_NV[i : i + r], dim=-1) for i in range(0, z_NV.shape[0], r)]) \
            if z_NV.shape[0] else z_NV.new_zeros(0)


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax(z)[idx]`` for a ``[N, V]`` block of logits, with the block itself as the only
    ``[N, V]`` tensor kept for the backward — which then turns it, in place, into the gradient:
    ``∂/∂z_v = g_v - softmax(z)_v Σ_u g_u`` (``g`` scattered from ``idx``). Used for the
    objectives whose loss reads the student's log-probs on a few ids per token (top-k supports,
    the sampled token): no ``[N, V]`` log-prob, probability or gradient copies besides ``z``.
    The block is consumed by the backward: one backward per forward (as under checkpointing).
    """

    @staticmethod
    def forward(ctx, z_NV, idx_NG, inplace):
        lse_N = _rowwise_logsumexp(z_NV)
        out_NG = z_NV.gather(-1, idx_NG) - lse_N[:, None]
        ctx.save_for_backward(z_NV, lse_N, idx_NG)
        ctx.mark_non_differentiable(lse_N)
        ctx.inplace = inplace
        return out_NG, lse_N

    @staticmethod
    def backward(ctx, grad_NG, _grad_lse):
        z_NV, lse_N, idx_NG = ctx.saved_tensors
        if not ctx.inplace:
            z_NV = z_NV.clone()
        g_NV = z_NV.sub_(lse_N[:, None]).exp_()  # softmax, in place: the block's last use
        g_NV.mul_(-grad_NG.sum(-1, keepdim=True))
        g_NV.scatter_add_(-1, idx_NG, grad_NG.to(g_NV.dtype))
        return g_NV, None, None


def gathered_log_softmax(z_NV: torch.Tensor, idx_NG: torch.Tensor, inplace: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(z)[idx] [N, G], logsumexp(z) [N])`` keeping one ``[N, V]`` block (see
    :class:`_GatheredLogSoftmax`). With ``inplace`` (the training loop) ``z`` must be a block of
    its own: the backward overwrites it; ``inplace=False`` copies it (repeatable backward)."""
    return _GatheredLogSoftmax.apply(z_NV, idx_NG.long(), inplace)


def entropy_from_logits(z_NV: torch.Tensor, lse_N: torch.Tensor | None = None) -> torch.Tensor:
    """``H = lse - Σ_v softmax(z)_v z_v`` per row (detached), a row sub-chunk at a time."""
    with torch.no_grad():
        if lse_N is None:
            lse_N = _rowwise_logsumexp(z_NV)
        out, r = [], _rows(z_NV)
        for i in range(0, z_NV.shape[0], r):
            z = z_NV[i : i + r]
            p = (z - lse_N[i : i + r, None]).exp_()
            out.append(lse_N[i : i + r] - torch.linalg.vecdot(p, z))
        return torch.cat(out) if out else z_NV.new_zeros(0)


def teacher_entropy_topk(topk_logp_NK: torch.Tensor, tail_N: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Entropy of the teacher coarsened to its top-k + one rest class (a lower bound of its
    full-vocabulary entropy; exact when the top-k covers the mass)."""
    with torch.no_grad():
        p_NK = topk_logp_NK.float().exp()
        rest_N = tail_N.float().clamp_min(0.0)
        h_N = -(p_NK * topk_logp_NK.float()).sum(-1)
        return h_N - torch.where(rest_N > eps, rest_N * rest_N.clamp_min(eps).log(), 0.0)


def student_topk(logp_NV: torch.Tensor, k: int) -> torch.Tensor:
    """The student's top-k ids (the support of student-side top-k divergences; no gradient)."""
    with torch.no_grad():
        return logp_NV.topk(k, dim=-1).indices
