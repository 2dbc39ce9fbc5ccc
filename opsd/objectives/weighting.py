"""Per-token weights and token selection for the distillation term.

All functions work on the ``N`` response tokens of a micro-batch, flattened
reply after reply (``seq_N`` = index of the reply a token belongs to, tokens of
one reply contiguous and in order; ``tokpos_N`` = index within the reply,
``resp_len_N`` = the reply's length). They return detached float weights; the
loss multiplies each token's divergence by its weight.
"""

from __future__ import annotations

import torch


def relative_position(tokpos_N: torch.Tensor, resp_len_N: torch.Tensor) -> torch.Tensor:
    """``u_t = (t + 0.5) / L`` in (0, 1): where a token sits inside its own reply."""
    return (tokpos_N.double() + 0.5) / resp_len_N.double().clamp_min(1)


def position_weights(
    tokpos_N: torch.Tensor,
    resp_len_N: torch.Tensor,
    mode: str,
    w_min: float = 0.2,
    tau: float = 0.5,
    scale: float = 0.1,
) -> torch.Tensor:
    """Weights that grow with the relative position ``u`` of a token in its reply.

    ``linear``: ``w = w_min + (1 - w_min) u``.
    ``sigmoid`` (PW-OPSD, Liu et al. 2026, arXiv:2605.21606, "When Are Teacher Tokens
    Reliable?"): ``w = w_min + (1 - w_min) σ((u - τ) / s)`` — late tokens, whose
    privileged-teacher targets were found the more reliable, weigh more.
    """
    u_N = relative_position(tokpos_N, resp_len_N)
    if mode == "linear":
        w_N = w_min + (1.0 - w_min) * u_N
    elif mode == "sigmoid":
        w_N = w_min + (1.0 - w_min) * torch.sigmoid((u_N - tau) / scale)
    else:
        raise ValueError(f"unknown position weighting {mode!r}")
    return w_N.float()


def _segment_sum(x_N: torch.Tensor, seq_N: torch.Tensor, n_seq: int | None = None) -> torch.Tensor:
    n_seq = int(seq_N.max()) + 1 if n_seq is None else n_seq
    return torch.zeros(n_seq, dtype=x_N.dtype).index_add_(0, seq_N, x_N)


def exclusive_prefix_sum(x_N: torch.Tensor, seq_N: torch.Tensor, tokpos_N: torch.Tensor) -> torch.Tensor:
    """``Σ_{s<t} x_s`` within each reply (tokens of a reply contiguous, ``tokpos`` 0 at its start)."""
    before_N = x_N.cumsum(0) - x_N  # Σ over everything before t, across replies
    n_seq = int(seq_N.max()) + 1 if seq_N.numel() else 0
    base_S = torch.zeros(n_seq, dtype=x_N.dtype)
    first = tokpos_N == 0
    base_S[seq_N[first]] = before_N[first]
    return before_N - base_S[seq_N]


def iw_opd_weights(
    abs_adv_N: torch.Tensor,
    seq_N: torch.Tensor,
    tokpos_N: torch.Tensor,
    gamma: float = 0.5,
    eps: float = 1e-8,
) -> torch.Tensor:
    """IW-OPD weights (Xie et al. 2026, arXiv:2606.22600, "On the Position Bias of On-Policy
    Distillation"): ``w_t = 1 + γ (1 - Σ_{s<t} |A_s| / max(Σ_s |A_s|, ε))`` with
    ``A_s = log πT(y_s) - log πBehaviour(y_s)`` — tokens after a large accumulated
    teacher–student discrepancy count less (as in TRL's ``IWOPDTrainer``)."""
    a_N = abs_adv_N.double()
    prefix_N = exclusive_prefix_sum(a_N, seq_N, tokpos_N)
    total_N = _segment_sum(a_N, seq_N)[seq_N].clamp_min(eps)
    return (1.0 + gamma * (1.0 - prefix_N / total_N)).float()


def normalize_per_sequence(w_N: torch.Tensor, seq_N: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rescale ``w`` to mean 1 within each reply (its total weight = its token count)."""
    n_seq = int(seq_N.max()) + 1
    total_S = _segment_sum(w_N.double(), seq_N, n_seq)
    count_S = _segment_sum(torch.ones_like(w_N, dtype=torch.float64), seq_N, n_seq)
    return (w_N.double() * (count_S / total_S.clamp_min(eps))[seq_N]).float()


def skip_first(tokpos_N: torch.Tensor, n: int) -> torch.Tensor:
    """Weight 0 for the first ``n`` tokens of every reply, 1 after."""
    return (tokpos_N >= n).float()


def entropy_weights(
    h_N: torch.Tensor, tau: float = 1.0, active_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy-aware weights (SRPO, Li et al. 2026, arXiv:2604.02288): ``w_t ∝ exp(-H_t / τ)``,
    normalised to mean 1 over the active tokens, so confident (low-entropy) targets weigh more
    and uncertain ones less. Inactive tokens get 0."""
    h_N = h_N.double()
    active_N = torch.ones_like(h_N, dtype=torch.bool) if active_N is None else active_N.bool()
    if not bool(active_N.any()):
        return torch.zeros_like(h_N, dtype=torch.float32)
    # Softmax form: stable for any entropy range.
    logits_N = torch.where(active_N, -h_N / tau, torch.full_like(h_N, -torch.inf))
    w_N = torch.softmax(logits_N, 0) * active_N.sum()
    return w_N.float()


def tip_select(
    h_N: torch.Tensor,
    div_N: torch.Tensor,
    entropy_fraction: float = 0.5,
    divergence_fraction: float = 0.1,
) -> torch.Tensor:
    """TIP token selection (Xu et al. 2026, arXiv:2604.14084, "Token Importance in On-Policy
    Distillation"): keep the ``entropy_fraction`` of tokens with the highest student entropy
    (uncertain: obvious signal) plus the low-entropy tokens whose teacher–student divergence is
    in the top ``divergence_fraction`` of all tokens (overconfident and wrong). Returns a bool mask.
    """
    n = h_N.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    keep_N = torch.zeros(n, dtype=torch.bool)
    k_h = int(round(entropy_fraction * n))
    if k_h > 0:
        keep_N[h_N.topk(k_h).indices] = True
    k_d = int(round(divergence_fraction * n))
    if k_d > 0:
        high_div_N = torch.zeros(n, dtype=torch.bool)
        high_div_N[div_N.topk(k_d).indices] = True
        keep_N |= high_div_N & ~keep_N  # the low-entropy ones (high-entropy are kept already)
    return keep_N


def selection_weights(keep_N: torch.Tensor) -> torch.Tensor:
    """Kept tokens weigh ``N / kept`` so the micro-batch's total weight is unchanged."""
    kept = int(keep_N.sum())
    if kept == 0:
        return torch.zeros(keep_N.shape, dtype=torch.float32)
    return keep_N.float() * (keep_N.numel() / kept)
