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

Engines that return only each view's top-k (vLLM's ``prompt_logprobs``) combine on a reduced
vocabulary (:func:`combine_topk`): at each position the union ``U`` of the views' top-k ids and
the sampled token, plus one bucket standing for the ``N - |U|`` other tokens. A view's log-prob
of a token of ``U`` it did not return is its unreturned mass spread evenly,
``log( (1 - Σ_known p_v) / (N - n_known_v) )``, the bucket's the same per token. Every rule takes
a per-entry multiplicity ``count`` (the bucket's is ``N - |U|``) so sums over the vocabulary stay
sums over all ``N`` tokens. Exact when each view's unreturned tokens are equally likely (always
when ``k = N``); otherwise ``mean_prob`` is off by at most the views' unreturned mass, and the
geometric rules, which weigh small probabilities, by more (measured in docs/vllm.md).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Combine = Callable[..., torch.Tensor]  # (views_VCV, tau, log_count_CV=None) -> [C, V]


def _normalise(x_CV: torch.Tensor, log_count_CV: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the vocabulary, an entry standing for ``count`` equal tokens."""
    if log_count_CV is None:
        return x_CV.log_softmax(-1)
    return x_CV - torch.logsumexp(x_CV + log_count_CV, -1, keepdim=True)


def mean_logprob(views_VCV: torch.Tensor, tau: float = 1.0,
                 log_count_CV: torch.Tensor | None = None) -> torch.Tensor:
    return _normalise(views_VCV.mean(0), log_count_CV)


def mean_prob(views_VCV: torch.Tensor, tau: float = 1.0,
              log_count_CV: torch.Tensor | None = None) -> torch.Tensor:
    # per token: normalised whenever every view is (multiplicities change nothing here)
    return torch.logsumexp(views_VCV, 0) - math.log(views_VCV.shape[0])


def gate(views_VCV: torch.Tensor, consensus_CV: torch.Tensor, tau: float,
         log_count_CV: torch.Tensor | None = None) -> torch.Tensor:
    """``g_C = exp(-D_C / τ)`` with ``D_C`` the views' mean KL(p_v ‖ p_c) at each position."""
    w_VCV = views_VCV if log_count_CV is None else views_VCV + log_count_CV
    p_VCV = w_VCV.exp()
    # 0 · log 0 = 0: entries of no mass (an empty bucket, a duplicate slot) add nothing
    terms = torch.where(p_VCV > 0, p_VCV * (views_VCV - consensus_CV.unsqueeze(0)), 0.0)
    kl_VC = terms.sum(-1).clamp_min(0.0)
    return torch.exp(-kl_VC.mean(0) / tau)


def gated_residual(views_VCV: torch.Tensor, tau: float = 1.0,
                   log_count_CV: torch.Tensor | None = None) -> torch.Tensor:
    c_CV = mean_logprob(views_VCV, tau, log_count_CV)
    g_C = gate(views_VCV, c_CV, tau, log_count_CV)
    return _normalise(c_CV + g_C[:, None] * (views_VCV[0] - c_CV), log_count_CV)


CONSENSUS: dict[str, Combine] = {
    "mean_logprob": mean_logprob,
    "mean_prob": mean_prob,
    "gated_residual": gated_residual,
}
MODES = ("none", *CONSENSUS)


def combine(views_VCV: torch.Tensor, mode: str, tau: float = 1.0,
            log_count_CV: torch.Tensor | None = None) -> torch.Tensor:
    """The target log-probs ``[C, V]`` of one chunk from its per-view log-probs ``[V, C, V]``
    (``log_count_CV``: entries standing for that many equal tokens, see :func:`combine_topk`)."""
    if views_VCV.shape[0] == 1 or mode == "none":
        return views_VCV[0]
    return CONSENSUS[mode](views_VCV, tau, log_count_CV)


def combine_topk(sampled_VR: torch.Tensor, ids_VRK: torch.Tensor, logprobs_VRK: torch.Tensor,
                 y_R: torch.Tensor, vocab_size: int, mode: str, tau: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine views known only by their top-k (see the module docstring).

    ``sampled_VR``: each view's log-prob of the response token ``y_R``; ``ids_VRK`` /
    ``logprobs_VRK``: each view's top-k. Returns the target's (sampled_R, topk_ids_RK [int32],
    topk_logprobs_RK, tail_mass_R), as a full-vocabulary scorer's targets.
    """
    V, R, K = ids_VRK.shape
    if R == 0:
        z = torch.zeros(0)
        return z, torch.zeros((0, K), dtype=torch.int32), torch.zeros((0, K)), z
    ids_VRK, y_R = ids_VRK.long(), y_R.long()
    lps_VRK, sampled_VR = logprobs_VRK.float(), sampled_VR.float()
    # slots: every view's top-k, then the sampled token; S = V*K + 1
    slot_RS = torch.cat([ids_VRK.permute(1, 0, 2).reshape(R, V * K), y_R[:, None]], 1)
    S = slot_RS.shape[1]
    # a slot counts once per distinct id (its first occurrence)
    earlier_RSS = (slot_RS[:, :, None] == slot_RS[:, None, :]).tril(-1)
    first_RS = ~earlier_RSS.any(-1)
    n_union_R = first_RS.sum(-1)
    # per view: the returned entries (top-k, and the sampled token's exact value)
    hit_VRSK = slot_RS[None, :, :, None] == ids_VRK[:, :, None, :]
    known_VRS = hit_VRSK.any(-1)
    val_VRS = torch.where(hit_VRSK, lps_VRK[:, :, None, :], 0.0).sum(-1)
    is_y_RS = slot_RS == y_R[:, None]
    val_VRS = torch.where(~known_VRS & is_y_RS[None], sampled_VR[:, :, None], val_VRS)
    known_VRS = known_VRS | is_y_RS[None]
    # unreturned mass, spread evenly over the tokens the view did not return
    first_known_VRS = known_VRS & first_RS[None]
    known_mass_VR = torch.where(first_known_VRS, val_VRS.exp(), 0.0).sum(-1)
    n_unknown_VR = (vocab_size - first_known_VRS.sum(-1)).clamp_min(1)
    rest_VR = ((1.0 - known_mass_VR).clamp_min(1e-30) / n_unknown_VR).log()
    val_VRS = torch.where(known_VRS, val_VRS, rest_VR[:, :, None])
    # + the bucket: the N - |U| tokens in no slot
    views_VRX = torch.cat([val_VRS, rest_VR[:, :, None]], -1)
    log_count_RX = torch.cat([torch.where(first_RS, 0.0, float("-inf")),
                              (vocab_size - n_union_R).float().log()[:, None]], -1)
    t_RX = combine(views_VRX, mode, tau, log_count_RX)
    sampled_R = t_RX[:, S - 1]
    cand_RS = torch.where(first_RS, t_RX[:, :S], float("-inf"))
    top_RK, at_RK = cand_RS.topk(K, dim=-1)
    tail_R = (1.0 - top_RK.exp().sum(-1)).clamp_min(0.0)
    return sampled_R, slot_RS.gather(1, at_RK).to(torch.int32), top_RK, tail_R

