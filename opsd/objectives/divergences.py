"""Per-token divergences between teacher and student next-token distributions.

All functions take the student's log-softmax rows for ``N`` response tokens
(``logp_NV``, float32, with autograd) and the stored teacher targets for the
same tokens, and return a per-token loss ``loss_N`` (to be weighted and
averaged by the caller) plus a per-token divergence estimate ``div_N``
(detached, for logging and clipping).

Notation: ``πS`` student, ``πT`` teacher, ``y_t`` the sampled token,
``sg`` stop-gradient, ``K`` the teacher's top-k ids.
"""

from __future__ import annotations

import math

import torch

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and near -inf (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reverse_kl_sampled(
    logp_NV: torch.Tensor,
    token_N: torch.Tensor,
    teacher_logp_N: torch.Tensor,
    behaviour_logp_N: torch.Tensor | None = None,
    ratio_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token reverse KL in REINFORCE form (on-policy distillation, Agarwal et al. 2024;
    Lu & Thinking Machines 2025).

    ``A_t = sg(log πT(y_t) - log πS(y_t))``,  ``loss_t = -w_t · A_t · log πS(y_t)``.

    Its gradient is an unbiased estimate of ``∇ KL(πS || πT)`` when ``y_t ~ πS``.
    With ``ratio_clip = c`` tokens sampled from a stale behaviour policy are
    importance-weighted by ``w_t = clip(πS(y_t)/πbehaviour(y_t), 1/c, c)``
    (detached); otherwise ``w_t = 1``. ``div_t = log πS(y_t) - log πT(y_t)``
    is the per-token k1 estimate of the reverse KL.
    """
    logp_s_N = logp_NV.gather(-1, token_N[:, None]).squeeze(-1)
    advantage_N = (teacher_logp_N - logp_s_N).detach()
    weight_N = torch.ones_like(advantage_N)
    if ratio_clip is not None and behaviour_logp_N is not None:
        weight_N = (logp_s_N.detach() - behaviour_logp_N).exp().clamp(1.0 / ratio_clip, ratio_clip)
    loss_N = -(weight_N * advantage_N) * logp_s_N
    return loss_N, (-advantage_N)


def forward_kl_topk(
    logp_NV: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    topk_logp_NK: torch.Tensor,
    tail_N: torch.Tensor,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k forward KL with a tail bucket (the "rest" class of mass ``1 - Σ_K pT``).

    ``loss_t = Σ_{k∈K} pT_k (log pT_k - log pS_k) + pT_rest (log pT_rest - log pS_rest)``

    where ``pS_rest = 1 - Σ_{k∈K} pS_k``. This is the exact KL between the two
    distributions coarsened to ``k + 1`` classes, so it is ≥ 0, zero iff they
    agree on those classes, and equals the full-vocabulary forward KL when
    ``K`` covers the vocabulary.
    """
    logp_s_NK = logp_NV.gather(-1, topk_ids_NK.long())
    logp_t_NK = topk_logp_NK.to(logp_NV.dtype)
    p_t_NK = logp_t_NK.exp()
    head_N = (p_t_NK * (logp_t_NK - logp_s_NK)).sum(-1)
    tail_t_N = tail_N.to(logp_NV.dtype).clamp_min(eps)
    log_tail_s_N = log1mexp(torch.logsumexp(logp_s_NK, dim=-1))
    tail_term_N = torch.where(tail_N > eps, tail_t_N * (tail_t_N.log() - log_tail_s_N), 0.0)
    loss_N = head_N + tail_term_N
    return loss_N, loss_N.detach()


def entropy(logp_NV: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``-Σ p log p`` of the student (detached)."""
    with torch.no_grad():
        return -(logp_NV.exp() * logp_NV).sum(-1)
