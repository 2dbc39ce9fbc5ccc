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


# --------------------------------------------------------------------------- brute-force references
# Direct formulas over the full vocabulary (float64) for every divergence, and gradchecks.


def _coarse(logp, ids, tail):
    """Distribution coarsened onto ids (+ rest class) or renormalised on ids — by enumeration."""
    out = []
    for n in range(logp.shape[0]):
        keep = ids[n]
        p = logp[n, keep].exp()
        if tail == "tail":
            mask = torch.ones(logp.shape[1], dtype=torch.bool)
            mask[keep] = False
            p = torch.cat([p, logp[n, mask].exp().sum()[None]])
        else:
            p = p / p.sum()
        out.append(p)
    return torch.stack(out)


def _kl(p, q):
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_forward_kl_topk_matches_brute_force(tail, k):
    ls, lt = _rand()
    ids, vals, rest = _topk(lt, k)
    loss, div = D.forward_kl_topk(ls, ids, vals, rest if tail == "tail" else None, tail=tail)
    ref = _kl(_coarse(lt, ids, tail), _coarse(ls, ids, tail))
    if tail == "renorm" and k == 1:
        ref = torch.zeros_like(ref)  # one class: both distributions are a point mass
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(div, loss.detach())


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("k", [1, 4, 11])
@pytest.mark.parametrize("support", ["teacher", "student"])
def test_reverse_kl_topk_matches_brute_force(tail, k, support):
    ls, lt = _rand()
    src = lt if support == "teacher" else ls
    ids = src.topk(k, -1).indices
    t_ids = lt.gather(-1, ids)
    stored = (1 - t_ids.exp().sum(-1)).clamp_min(0) if support == "teacher" else None
    loss, _ = D.reverse_kl_topk(ls, ids, t_ids, stored if tail == "tail" else None, tail=tail)
    ref = _kl(_coarse(ls, ids, tail), _coarse(lt, ids, tail))
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-7)


def test_topk_with_tail_equals_full_vocabulary_when_k_is_v():
    ls, lt = _rand(5, 13)
    V = ls.shape[-1]
    ids, vals, rest = _topk(lt, V)
    fwd, _ = D.forward_kl_topk(ls, ids, vals, rest)
    rev, _ = D.reverse_kl_topk(ls, ids, vals, rest)
    torch.testing.assert_close(fwd, _kl(lt.exp(), ls.exp()), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(rev, _kl(ls.exp(), lt.exp()), atol=1e-9, rtol=1e-7)
    # and the full-vocabulary JSD end points are the same KLs
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 0.0)[0], fwd, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 1.0)[0], rev, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_direct_formula(beta):
    ls, lt = _rand()
    ps, pt = ls.exp(), lt.exp()
    if beta == 0.0:
        ref = _kl(pt, ps)
    elif beta == 1.0:
        ref = _kl(ps, pt)
    else:
        m = beta * pt + (1 - beta) * ps
        ref = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    loss, _ = D.generalized_jsd(ls, lt, beta)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-8)
    assert (loss >= -1e-12).all()


def test_element_and_token_clipping_follow_the_opsd_reference():
    ls, lt = _rand(6, 9)
    c = 0.05
    # OPSD's code: per-vocabulary contribution clamped at c, then summed over the vocabulary.
    elem = (lt.exp() * (lt - ls)).clamp(max=c).sum(-1)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 0.0, clip=c)[0], elem)
    tok = _kl(lt.exp(), ls.exp()).clamp(max=c)
    torch.testing.assert_close(D.generalized_jsd(ls, lt, 0.0, clip=c, clip_mode="token")[0], tok)
    ids, vals, rest = _topk(lt, 9)
    torch.testing.assert_close(D.forward_kl_topk(ls, ids, vals, rest, clip=c)[0], elem)
    # a clamped term gives no gradient
    x = ls.clone().requires_grad_(True)
    D.generalized_jsd(x, lt, 0.0, clip=1e-9, clip_mode="token")[0].sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_reverse_kl_sampled_reward_scale_and_baseline_formula():
    ls, lt = _rand(7, 10)
    y = torch.randint(0, 10, (7,))
    lp_s, lp_t = ls.gather(-1, y[:, None]).squeeze(-1), lt.gather(-1, y[:, None]).squeeze(-1)
    ref_lp = lp_s - torch.rand(7, dtype=torch.float64)  # a reference (behaviour) policy
    b = -_kl(ls.exp(), lt.exp())
    lam = 2.5
    loss, div = D.reverse_kl_sampled(ls, y, lp_t, ref_lp, reward_scale=lam, baseline_N=b)
    adv = lam * (lp_t - ref_lp) - (lp_s - ref_lp) - b
    torch.testing.assert_close(loss, -adv * lp_s)
    torch.testing.assert_close(div, lp_s - lp_t)
    # lambda = 1 is plain OPD whatever the reference
    l1, _ = D.reverse_kl_sampled(ls, y, lp_t, ref_lp, reward_scale=1.0)
    torch.testing.assert_close(l1, -(lp_t - lp_s) * lp_s)
    # advantage clipping
    lc, _ = D.reverse_kl_sampled(ls, y, lp_t, clip=0.1)
    torch.testing.assert_close(lc, -(lp_t - lp_s).clamp(-0.1, 0.1) * lp_s)


def test_g_opd_reference_model_replaces_the_behaviour_policy_in_the_advantage_only():
    """teacher.reference (G-OPD's πRef) enters A_t = λ(log πT − log πRef) − (log πS − log πRef);
    the importance weight stays πS/πbehaviour; at λ = 1 πRef cancels."""
    ls, lt = _rand(6, 8)
    y = torch.randint(0, 8, (6,))
    lp_s, lp_t = ls.gather(-1, y[:, None]).squeeze(-1), lt.gather(-1, y[:, None]).squeeze(-1)
    beh = lp_s - 0.3 * torch.rand(6, dtype=torch.float64)
    ref = lp_s - torch.rand(6, dtype=torch.float64)  # another model: the teacher's pre-RL base
    lam = 1.5
    loss, _ = D.reverse_kl_sampled(ls, y, lp_t, beh, 2.0, reward_scale=lam, reference_logp_N=ref)
    adv = lam * (lp_t - ref) - (lp_s - ref)
    w = (lp_s - beh).exp().clamp(0.5, 2.0)
    torch.testing.assert_close(loss, -adv * w * lp_s)
    one, _ = D.reverse_kl_sampled(ls, y, lp_t, beh, reward_scale=1.0, reference_logp_N=ref)
    torch.testing.assert_close(one, -(lp_t - lp_s) * lp_s)


def test_vopd_baseline_keeps_the_gradient_unbiased():
    # E_{y~πS}[∇ loss(y)] with the baseline b = -KL(πS||πT) equals the plain OPD expectation
    # (= ∇ KL(πS||πT)): b does not depend on y.
    V = 6
    logits = torch.randn(V, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(V, dtype=torch.float64).log_softmax(-1)

    def expected_grad(with_baseline):
        x = logits.detach().clone().requires_grad_(True)
        ls = x.log_softmax(-1)
        b = -_kl(ls.exp(), lt.exp()).detach()[None] if with_baseline else None
        tot = 0
        for y in range(V):
            loss, _ = D.reverse_kl_sampled(ls[None], torch.tensor([y]), lt[y][None], baseline_N=b)
            tot = tot + ls[y].exp().detach() * loss.sum()
        return torch.autograd.grad(tot, x)[0]

    torch.testing.assert_close(expected_grad(True), expected_grad(False), atol=1e-10, rtol=1e-8)


def test_nll_and_teacher_entropy():
    ls, lt = _rand()
    y = torch.randint(0, ls.shape[1], (ls.shape[0],))
    torch.testing.assert_close(D.sampled_nll(ls, y)[0], -ls.gather(-1, y[:, None]).squeeze(-1))
    ids, vals, rest = _topk(lt, lt.shape[1])
    torch.testing.assert_close(D.teacher_entropy_topk(vals, rest).double(), D.entropy(lt), atol=1e-5,
                               rtol=1e-5)


def _gc(f, shape=(4, 9)):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: f(z.log_softmax(-1)), (x,))


@pytest.mark.parametrize("tail", ["tail", "renorm"])
def test_gradcheck_topk_divergences(tail):
    _, lt = _rand(4, 9)
    ids, vals, rest = _topk(lt, 3)
    _gc(lambda lp: D.forward_kl_topk(lp, ids, vals, rest, tail=tail)[0])
    _gc(lambda lp: D.reverse_kl_topk(lp, ids, vals, rest, tail=tail)[0])
    _gc(lambda lp: D.reverse_kl_topk(lp, ids, vals, None, tail=tail)[0])


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck_jsd(beta):
    _, lt = _rand(4, 9)
    _gc(lambda lp: D.generalized_jsd(lp, lt, beta)[0])
    _gc(lambda lp: D.generalized_jsd(lp, lt, beta, clip=0.05)[0])


def test_gradcheck_sampled_losses():
    # The sampled-token loss is a policy-gradient *surrogate*: its value moves with the detached
    # advantage, so finite differences of the value are not its gradient. What must hold: its
    # autograd gradient is exactly -(w A) ∇log πS(y) with (w, A) frozen at the point — that
    # function is gradchecked — and in expectation over y it is ∇KL (the unbiasedness tests).
    _, lt = _rand(4, 9)
    y = torch.tensor([0, 3, 5, 8])
    lp_t = lt.gather(-1, y[:, None]).squeeze(-1)
    beh = lp_t - 0.3
    b = torch.rand(4, dtype=torch.float64)
    x0 = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    ls0 = x0.log_softmax(-1)
    loss, _ = D.reverse_kl_sampled(ls0, y, lp_t, beh, 2.0, reward_scale=1.7, baseline_N=b)
    (g,) = torch.autograd.grad(loss.sum(), x0)
    lp_s = ls0.detach().gather(-1, y[:, None]).squeeze(-1)
    coef = (1.7 * (lp_t - beh) - (lp_s - beh) - b) * (lp_s - beh).exp().clamp(0.5, 2.0)

    def frozen(z):
        return -(coef * z.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1))

    assert torch.autograd.gradcheck(frozen, (x0.detach().clone().requires_grad_(True),))
    x1 = x0.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(frozen(x1).sum(), x1)
    torch.testing.assert_close(g, g_ref)
    _gc(lambda lp: D.sampled_nll(lp, y)[0])


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("clip,mode", [(None, "element"), (0.05, "element"), (0.3, "token")])
def test_fused_jsd_matches_plain_autograd(beta, clip, mode):
    ls, lt = _rand(8, 12)
    x1 = ls.clone().requires_grad_(True)
    x2 = ls.clone().requires_grad_(True)
    a, _ = D.generalized_jsd(x1, lt, beta, clip=clip, clip_mode=mode)
    b = D.generalized_jsd_reference(x2, lt, beta, clip=clip, clip_mode=mode)
    torch.testing.assert_close(a, b)
    w = torch.rand(8, dtype=torch.float64)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_gathered_log_softmax_matches_log_softmax_and_gather():
    z = torch.randn(7, 13, dtype=torch.float64)
    idx = torch.randint(0, 13, (7, 4))
    idx[:, 1] = idx[:, 0]  # a repeated id (the sampled token inside the top-k) accumulates
    w = torch.randn(7, 4, dtype=torch.float64)
    z1 = z.clone().requires_grad_(True)
    ref = z1.log_softmax(-1).gather(-1, idx)
    (ref * w).sum().backward()
    z2 = z.clone().requires_grad_(True)
    out, lse = D.gathered_log_softmax(z2 * 1.0, idx)  # its own block: overwritten by backward
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    (out * w).sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad)
    assert torch.autograd.gradcheck(lambda x: D.gathered_log_softmax(x, idx, inplace=False)[0],
                                    (z.clone().requires_grad_(True),))
    torch.testing.assert_close(D.entropy_from_logits(z), D.entropy(z.log_softmax(-1)))


def test_log_softmax_rows_gradient():
    z = torch.randn(70, 11, dtype=torch.float64, requires_grad=True)  # > one row sub-chunk
    assert torch.autograd.gradcheck(D.log_softmax_rows, (z,))
    torch.testing.assert_close(D.log_softmax_rows(z), z.log_softmax(-1))
    _, lt = _rand(70, 11)
    for beta in (0.0, 0.5, 1.0):
        x1, x2 = z.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
        D.generalized_jsd(D.log_softmax_rows(x1), lt, beta, clip=0.02)[0].sum().backward()
        D.generalized_jsd_reference(x2.log_softmax(-1), lt, beta, clip=0.02).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("beta,clip,mode", [(0.0, None, "element"), (0.5, None, "element"),
                                            (1.0, None, "element"), (0.5, 0.05, "element"),
                                            (0.0, 0.3, "token")])
def test_inplace_jsd_backward_equals_the_copying_one(beta, clip, mode):
    """The training loop's in-place path (gradient written into the teacher's block, the
    log-softmax backward over its incoming gradient) gives the same gradient as the copying one."""
    torch.manual_seed(0)
    z = torch.randn(37, 50, dtype=torch.float64)
    t = torch.randn(37, 50, dtype=torch.float64).log_softmax(-1)
    w = torch.rand(37, dtype=torch.float64)
    grads = []
    for inplace in (False, True):
        zz = z.clone().requires_grad_(True)
        tt = t.clone()  # the in-place path consumes its teacher block
        s = D.log_softmax_rows(zz, inplace=inplace)
        loss, _ = D.generalized_jsd(s, tt, beta, clip=clip, clip_mode=mode, inplace=inplace)
        (loss * w).sum().backward()
        grads.append(zz.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_policy_gradient_ppo_clip_bounds_the_push_and_matches_reinforce_at_ratio_one():
    torch.manual_seed(0)
    behaviour = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    # ratios 1, 1.5, 0.5, 1, 1.5, 0.5; advantages +, +, +, -, -, -
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.0, 1.5, 0.5], dtype=torch.float64)
    adv = torch.tensor([0.7, 0.7, 0.7, -0.7, -0.7, -0.7], dtype=torch.float64)
    logp = (behaviour + ratio.log()).requires_grad_()
    D.policy_gradient(logp, behaviour, adv, ppo_clip=0.2).sum().backward()
    g = logp.grad
    # d/dlogp of -rho*A = -A*rho inside the band; 0 where rho left it in A's direction
    expected = torch.tensor([-0.7, 0.0, -0.7 * 0.5, 0.7, 0.7 * 1.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(g, expected)
    # at rho = 1 the surrogate's gradient is REINFORCE's
    lp1 = behaviour.clone().requires_grad_()
    D.policy_gradient(lp1, behaviour, adv, ppo_clip=0.2).sum().backward()
    lp2 = behaviour.clone().requires_grad_()
    D.policy_gradient(lp2, behaviour, adv).sum().backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)
    torch.testing.assert_close(lp2.grad, -adv)
    # ratio-weighted REINFORCE: detached weight clip(rho, 1/c, c)
    lp3 = logp.detach().clone().requires_grad_()
    D.policy_gradient(lp3, behaviour, adv, ratio_clip=1.25).sum().backward()
    torch.testing.assert_close(lp3.grad, -adv * ratio.clamp(0.8, 1.25))
    assert torch.autograd.gradcheck(
        lambda x: D.policy_gradient(x, behaviour, adv, ppo_clip=0.2).sum(),
        (behaviour + torch.tensor([0.05, 0.1, -0.1, 0.0, 0.1, -0.1], dtype=torch.float64)).requires_grad_())
