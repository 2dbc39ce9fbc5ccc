"""Multi-view teachers: combining the teacher's distributions under several privileged views.

With ``teacher.context.consensus`` the response is scored once per view set in
``consensus_views``; at every response position each view ``v = 1..V`` gives log-probs
``ℓ_v`` over the vocabulary, and one rule (a registry entry) combines them into the target:

    mean_logprob    c = log_softmax( (1/V) Σ_v ℓ_v )         normalised geometric mean
                                                              (a product of experts)
    mean_prob       m = log( (1/V) Σ_v exp ℓ_v )             the mixture of the views
    gated_residual  t = log_softmax( c + g · (ℓ_1 − c) )     AVSD-style consensus + the first
                    g = exp( −D / τ ),                       view's own residual, let through
                    D = (1/V) Σ_v KL(p_v ‖ p_c)              where the views agree

``gated_residual`` is opsd's reading of AVSD's "consensus plus gated view-specific residual": the
consensus carries what every view supports; the first (primary) view's deviation from it is added
back in proportion to the views' agreement at that position (``D`` small → ``g`` near 1, the
primary view's detail kept; views that disagree → ``g`` near 0, the consensus alone), so one view's
idiosyncrasies are damped exactly where the others contradict them. ``τ`` is
``teacher.context.consensus_tau`` (nats). Shapes: ``views_VCV`` = [views, positions, vocabulary].
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Combine = Callable[[torch.Tensor, float], torch.Tensor]


def mean_logprob(views_VCV: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return views_VCV.mean(0).log_softmax(-1)


def mean_prob(views_VCV: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return torch.logsumexp(views_VCV, 0) - math.log(views_VCV.shape[0])


def gate(views_VCV: torch.Tensor, consensus_CV: torch.Tensor, tau: float) -> torch.Tensor:
    """``g_C = exp(-D_C / τ)`` with ``D_C`` the views' mean KL(p_v ‖ p_c) at each position."""
    p_VCV = views_VCV.exp()
    kl_VC = (p_VCV * (views_VCV - consensus_CV.unsqueeze(0))).sum(-1).clamp_min(0.0)
    return torch.exp(-kl_VC.mean(0) / tau)


def gated_residual(views_VCV: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    c_CV = mean_logprob(views_VCV)
    g_C = gate(views_VCV, c_CV, tau)
    return (c_CV + g_C[:, None] * (views_VCV[0] - c_CV)).log_softmax(-1)


CONSENSUS: dict[str, Combine] = {
    "mean_logprob": mean_logprob,
    "mean_prob": mean_prob,
    "gated_residual": gated_residual,
}
MODES = ("none", *CONSENSUS)


def combine(views_VCV: torch.Tensor, mode: str, tau: float = 1.0) -> torch.Tensor:
    """The target log-probs ``[C, V]`` of one chunk from its per-view log-probs ``[V, C, V]``."""
    if views_VCV.shape[0] == 1 or mode == "none":
        return views_VCV[0]
    return CONSENSUS[mode](views_VCV, tau)
