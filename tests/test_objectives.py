"""Divergences against brute-force full-vocabulary references, and gradchecks."""

import math

import pytest
import torch

from opsd.objectives import divergences as D

torch.manual_seed(0)


def _rand(N=6, V=11, dtype=torch.float64):
    s = torch.randn(N, V, dtype=dtype) * 2
    t = torch.randn(N, V, dtype=dtype) * 2
    return s.log_softmax(-1), t.log_softmax(-1)


def _topk(logp_t, k):
    vals, ids = logp_t.topk(k, -1)
    tail = 1 - vals.exp().sum(-1)
    return ids, vals, tail.clamp_min(0)


def test_forward_kl_topk_equals_full_kl_when_k_is_vocab():
    ls, lt = _rand()
    ids, vals, tail = _topk(lt, lt.shape[-1])
    loss, _ = D.forward_kl_topk(ls, ids, vals, tail)
    full = (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(loss, full, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_forward_kl_topk_is_kl_of_coarsened_distributions(k):
    ls, lt = _rand()
    ids, vals, tail = _topk(lt, k)
    loss, _ = D.forward_kl_topk(ls, ids, vals, tail)
    for n in range(ls.shape[0]):
        keep = ids[n]
        mask = torch.ones(ls.shape[1], dtype=torch.bool)
        mask[keep] = False
        pt = torch.cat([lt[n, keep].exp(), lt[n, mask].exp().sum()[None]])
        ps = torch.cat([ls[n, keep].exp(), ls[n, mask].exp().sum()[None]])
        ref = (pt * (pt.log() - ps.log())).sum()
        assert math.isclose(loss[n].item(), ref.item(), rel_tol=1e-7, abs_tol=1e-10)
        assert loss[n] >= -1e-12


def test_forward_kl_topk_gradcheck():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    _, lt = _rand(4, 9)
    ids, vals, tail = _topk(lt, 3)
    assert torch.autograd.gradcheck(
        lambda x: D.forward_kl_topk(x.log_softmax(-1), ids, vals, tail)[0], (logits,)
    )


def test_reverse_kl_sampled_gradient_is_unbiased_reverse_kl_gradient():
    # E_{y~πS}[∇(-A(y) log πS(y))] = ∇ KL(πS||πT): check with exact expectation over y.
    V = 7
    logits = torch.randn(V, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(V, dtype=torch.float64).log_softmax(-1)
    ls = logits.log_softmax(-1)
    exp_loss = 0
    for y in range(V):
        loss, _ = D.reverse_kl_sampled(ls[None], torch.tensor([y]), lt[y][None])
        exp_loss = exp_loss + ls[y].exp().detach() * loss.sum()
    (g_est,) = torch.autograd.grad(exp_loss, logits)
    logits2 = logits.detach().clone().requires_grad_(True)
    ls2 = logits2.log_softmax(-1)
    kl = (ls2.exp() * (ls2 - lt)).sum()
    (g_ref,) = torch.autograd.grad(kl, logits2)
    torch.testing.assert_close(g_est, g_ref, atol=1e-10, rtol=1e-8)


def test_reverse_kl_sampled_importance_ratio_clipped():
    ls, lt = _rand(5, 8)
    y = torch.arange(5)
    beh = ls.gather(-1, y[:, None]).squeeze(-1) - 5.0  # behaviour much less likely → ratio e^5
    loss_w, _ = D.reverse_kl_sampled(ls, y, lt.gather(-1, y[:, None]).squeeze(-1), beh, ratio_clip=2.0)
    loss_1, _ = D.reverse_kl_sampled(ls, y, lt.gather(-1, y[:, None]).squeeze(-1))
    torch.testing.assert_close(loss_w, 2.0 * loss_1)


def test_log1mexp_accuracy():
    x = torch.tensor([-1e-6, -0.1, -0.693, -1.0, -10.0, -50.0], dtype=torch.float64)
    ref = torch.log(1 - torch.exp(x))
    torch.testing.assert_close(D.log1mexp(x), ref, rtol=1e-6, atol=1e-12)
