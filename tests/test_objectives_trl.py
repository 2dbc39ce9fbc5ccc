"""Cross-check with an independent implementation: TRL's own loss functions (PyPI ``trl``,
a test-only dependency) on the same random logits must agree with opsd's to 1e-5."""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")

from opsd.objectives import divergences as D  # noqa: E402
from opsd.objectives import mixing as M  # noqa: E402
from opsd.objectives import weighting as W  # noqa: E402

B, T, V = 3, 5, 17
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    return s, t, y


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_trl_gkd(logits, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    s, t, _ = logits
    ours, _ = D.generalized_jsd((s / temperature).log_softmax(-1).reshape(-1, V),
                                (t / temperature).log_softmax(-1).reshape(-1, V), beta)
    # TRL reduces; feed it one token at a time to compare per-token values.
    theirs = torch.stack([
        GKDTrainer.generalized_jsd_loss(s.reshape(-1, V)[i][None, None], t.reshape(-1, V)[i][None, None],
                                        beta=beta, temperature=temperature, reduction="sum")
        for i in range(B * T)
    ])
    torch.testing.assert_close(ours, theirs, **TOL)
    # and the batch mean as TRL computes it
    batchmean = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours.sum() / B, batchmean, **TOL)


def test_generalized_jsd_gradient_matches_trl(logits):
    from trl.experimental.gkd import GKDTrainer

    s, t, _ = logits
    x1 = s.clone().requires_grad_(True)
    D.generalized_jsd(x1.log_softmax(-1).reshape(-1, V), t.log_softmax(-1).reshape(-1, V), 0.5)[0].sum().backward()
    x2 = s.clone().requires_grad_(True)
    GKDTrainer.generalized_jsd_loss(x2, t, beta=0.5, reduction="sum").backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)


def test_sampled_token_loss_matches_trl_sdpo(logits):
    from trl.experimental.sdpo.loss_utils import compute_sampled_token_self_distillation_loss

    s, t, y = logits
    ls, lt = s.log_softmax(-1).reshape(-1, V), t.log_softmax(-1).reshape(-1, V)
    x1 = s.clone().requires_grad_(True)
    ours, _ = D.reverse_kl_sampled(x1.log_softmax(-1).reshape(-1, V), y.reshape(-1),
                                   lt.gather(-1, y.reshape(-1, 1)).squeeze(-1))
    x2 = s.clone().requires_grad_(True)
    theirs = compute_sampled_token_self_distillation_loss(x2, t, y, distillation_alpha=1.0)
    torch.testing.assert_close(ours, theirs.reshape(-1), **TOL)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    del ls


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_student_topk_divergences_match_trl_sdpo(logits, add_tail, alpha):
    """SDPO's top-k mode: the student's top-k support, tail bucket or renormalised; alpha 0 is
    forward KL(T||S), alpha 1 reverse KL(S||T)."""
    from trl.experimental.sdpo.loss_utils import compute_topk_self_distillation_loss

    s, t, _ = logits
    k = 6
    theirs = compute_topk_self_distillation_loss(s, t, distillation_topk=k, distillation_alpha=alpha,
                                                 distillation_add_tail=add_tail).reshape(-1)
    ls, lt = s.log_softmax(-1).reshape(-1, V), t.log_softmax(-1).reshape(-1, V)
    ids = D.student_topk(ls, k)
    fn = D.forward_kl_topk if alpha == 0.0 else D.reverse_kl_topk
    ours, _ = fn(ls, ids, lt.gather(-1, ids), None, tail="tail" if add_tail else "renorm")
    torch.testing.assert_close(ours, theirs, **TOL)


def test_iw_opd_weights_match_trl(logits):
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    s, t, y = logits
    lt = t.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    rollout = s.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1) - 0.2  # a stale behaviour policy
    labels = y.clone()
    stub = SimpleNamespace(temperature=1.0, iw_opd_epsilon=1e-8, iw_opd_gamma=0.7,
                           model=SimpleNamespace(training=True),
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    x2 = s.clone().requires_grad_(True)
    theirs = IWOPDTrainer._compute_iw_opd_loss(stub, x2, y, labels, lt, rollout)
    # opsd: the same weights on the sampled-token loss whose advantage uses the behaviour policy
    seq = torch.arange(B).repeat_interleave(T)
    pos = torch.arange(T).repeat(B)
    w = W.iw_opd_weights((lt - rollout).abs().reshape(-1), seq, pos, gamma=0.7)
    x1 = s.clone().requires_grad_(True)
    lp = x1.log_softmax(-1).reshape(-1, V)
    lp_y = lp.gather(-1, y.reshape(-1, 1)).squeeze(-1)
    adv = (lt - rollout).reshape(-1)
    ours = (-(w.double() * adv) * lp_y).mean()
    torch.testing.assert_close(ours, theirs, **TOL)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)


def test_group_advantages_match_trl_grpo_formula():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 2, (4, 4), generator=g).double()
    rewards[0] = torch.tensor([0.0, 1.0, 0.5, 0.25])
    mean = rewards.mean(1, keepdim=True)
    theirs = ((rewards - mean) / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)).reshape(-1)
    groups = [f"row{i}" for i in range(4) for _ in range(4)]
    ours = M.group_advantages(rewards.reshape(-1).tolist(), groups, 1e-4)
    torch.testing.assert_close(torch.as_tensor(ours), theirs, **TOL)
