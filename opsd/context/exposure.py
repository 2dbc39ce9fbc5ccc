"""How much of the reference solution the teacher sees at each online iteration
(``teacher.context.exposure``): one schedule per mode, chosen from a registry.

    fixed     r_i = ratio
    linear    r_i = start + (end − start) · min(1, i / (iterations − 1))
    adaptive  r_{i+1} = clip(r_i ± step): more when the student's pass rate is below
              target_pass, less when above
    atesd     ATESD (Han et al. 2026, "Adaptive Teacher Exposure for Self-Distillation in LLM
              Reasoning", arXiv:2605.11458): a Beta-policy controller samples the ratio, holds it
              for a window of ``hold`` iterations, and learns from a discounted learning-progress
              reward (below)

ATESD as implemented here. Decision ``j`` covers iterations ``[j·hold, (j+1)·hold)``; ``p̄_j`` is
the student's mean pass rate over that window's rollouts (sampled before each iteration's
update, so window ``j+1`` shows what window ``j``'s training did):

    x_j   = [1, p̄_{j−1}, r_{j−1}]                              compact training-state features
    r_j   ~ Beta(α_j, β_j),  α_j = 1 + softplus(θ_α·x_j),  β_j = 1 + softplus(θ_β·x_j)
    Δ_j   = p̄_{j+1} − p̄_j                                      learning progress of window j
    R_j   = Σ_{m=0}^{H−1} γ^m Δ_{j+m}                           discounted: credit for the future
    θ    ← θ + η (R_j − b) ∇_θ log Beta(r_j; α_j, β_j)          REINFORCE once R_j is complete,
    b    ← running mean of the rewards                          (window j+H observed)

Simplified against the paper: the state is the pass rate and the previous ratio (the paper's
compact statistics also include loss-type signals), progress is measured on the training
rollouts' pass rate rather than a held-out set, and the controller is linear in its features.
Everything it reads is stored in the run's rollout artifacts and every sample is seeded by
``(seed, j)``, so a resumed run replays the same decisions without extra state.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# (exposure config, iteration, total iterations, pass rate per finished iteration, seed) -> ratio
Schedule = Callable[..., float]


def fixed(ex, iteration: int, iterations: int, pass_rates: dict, seed: int) -> float:
    return ex.ratio


def linear(ex, iteration: int, iterations: int, pass_rates: dict, seed: int) -> float:
    n = max(1, iterations - 1)
    return ex.start + (ex.end - ex.start) * min(1.0, iteration / n)


def adaptive(ex, iteration: int, iterations: int, pass_rates: dict, seed: int) -> float:
    ratio = ex.ratio
    for i in range(iteration):
        rate = pass_rates.get(i)
        if rate is None:
            continue
        ratio += ex.step if rate < ex.target_pass else -ex.step
        ratio = min(1.0, max(0.0, ratio))
    return ratio


class BetaController:
    """ATESD's exposure policy: Beta(α, β) over the reveal ratio, linear in the state features."""

    def __init__(self, lr: float):
        self.theta = torch.zeros(2, 3, dtype=torch.float64)  # rows: α, β; α = β = 1 + ln 2 at start
        self.lr = lr
        self.baseline: float | None = None

    def dist(self, x: torch.Tensor) -> torch.distributions.Beta:
        a, b = 1.0 + torch.nn.functional.softplus(self.theta @ x)
        return torch.distributions.Beta(a, b)

    def sample(self, x: torch.Tensor, seed: int, decision: int) -> float:
        d = self.dist(x)
        r = np.random.default_rng([seed, decision]).beta(float(d.concentration1),
                                                         float(d.concentration0))
        return min(1.0 - 1e-4, max(1e-4, float(r)))

    def update(self, x: torch.Tensor, ratio: float, reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = 0.9 * self.baseline + 0.1 * reward
        theta = self.theta.clone().requires_grad_(True)
        a, b = 1.0 + torch.nn.functional.softplus(theta @ x)
        logp = torch.distributions.Beta(a, b).log_prob(torch.tensor(ratio, dtype=torch.float64))
        (grad,) = torch.autograd.grad(logp, theta)
        self.theta = self.theta + self.lr * advantage * grad


def _window_means(pass_rates: dict, hold: int, windows: int) -> list[float | None]:
    out = []
    for j in range(windows):
        vals = [pass_rates.get(i) for i in range(j * hold, (j + 1) * hold)]
        vals = [v for v in vals if v is not None]
        out.append(sum(vals) / len(vals) if len(vals) == hold else None)
    return out


def atesd_decisions(ex, upto: int, pass_rates: dict, seed: int) -> list[float]:
    """The ratios of decisions ``0..upto`` (replayed from the pass rates; see the module doc)."""
    means = _window_means(pass_rates, ex.hold, upto + 1)
    ctl = BetaController(ex.controller_lr)
    ratios: list[float] = []
    feats: list[torch.Tensor] = []
    for j in range(upto + 1):
        # learn from every decision whose H-window reward is complete before deciding j
        k = j - 1 - ex.horizon
        if k >= 0 and all(means[k + m + 1] is not None and means[k + m] is not None
                          for m in range(ex.horizon)):
            reward = sum(ex.discount ** m * (means[k + m + 1] - means[k + m])
                         for m in range(ex.horizon))
            ctl.update(feats[k], ratios[k], reward)
        prev_p = means[j - 1] if j >= 1 and means[j - 1] is not None else 0.0
        prev_r = ratios[j - 1] if j >= 1 else ex.ratio
        x = torch.tensor([1.0, prev_p, prev_r], dtype=torch.float64)
        feats.append(x)
        ratios.append(ctl.sample(x, seed, j))
    return ratios


def atesd(ex, iteration: int, iterations: int, pass_rates: dict, seed: int) -> float:
    return atesd_decisions(ex, iteration // ex.hold, pass_rates, seed)[-1]


SCHEDULES: dict[str, Schedule] = {"fixed": fixed, "linear": linear, "adaptive": adaptive,
                                  "atesd": atesd}


def exposure_ratio(ex, iteration: int, iterations: int, pass_rates: dict[int, float | None],
                   seed: int = 0) -> float | None:
    """The reveal ratio of ``iteration``'s teacher pass (None: the fixed config value, which the
    teacher stage reads itself and keys as before)."""
    if ex.mode == "fixed":
        return None
    return SCHEDULES[ex.mode](ex, iteration, iterations, pass_rates, seed)

