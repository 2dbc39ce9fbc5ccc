"""CEPO (Heakl et al. 2026, arXiv:2605.19436): the contrast of a right- and a wrong-answer teacher
as token credit inside clipped GRPO — the credit against the paper's formula written out by hand,
the gradient against the closed form via autograd, and the choice of the rejected sibling. The
end-to-end run is tests/test_online_recipes.py::test_online_recipe_runs_end_to_end[cepo]."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opsd.stages.teacher import rejected_siblings

from opsd.config import PipelineConfig, TrainConfig
from opsd.objectives import divergences as D
from opsd.objectives import mixing as M
from opsd.objectives.plan import token_coefficients
from opsd.training.batches import Example, collate


def _paper(adv: float, c: float, lam: float, eps: float) -> float:
    """Â_t / A_i of the paper, one token at a time in plain floats."""
    adv = float(adv)
    sign = (adv > 0) - (adv < 0)
    w = math.exp(sign * c)
    return (1 - lam) + lam * min(max(w, 1 - eps), 1 + eps)


def test_credit_follows_the_paper_formula_token_by_token():
    rng = np.random.default_rng(0)
    adv = np.repeat([1.3, -0.8, 0.0], 6)
    c = rng.normal(0, 1.0, adv.size)
    c[:2] = [0.0, 2.0]  # filler keeps weight 1; a decisive token is clipped at 1 + eps
    for lam, eps in [(0.5, 0.5), (1.0, 0.2), (0.0, 0.5)]:
        got = M.cepo_credit(torch.tensor(adv), torch.tensor(c), lam, eps)
        want = [_paper(a, x, lam, eps) for a, x in zip(adv, c)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    one = M.cepo_credit(torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0.0, 2.0, 2.0]), 0.5, 0.5)
    # filler 1; passing decisive 0.5 + 0.5 * 1.5; failing reply, token the right answer favours:
    # less blame, 0.5 + 0.5 * 0.5
    np.testing.assert_allclose(one.numpy(), [1.0, 1.25, 0.75])
    assert (M.cepo_credit(torch.tensor(adv), torch.tensor(c), 0.5, 0.5) > 0).all()  # sign kept


def test_lambda_falls_linearly_to_zero_over_the_decay_fraction():
    assert M.cepo_lambda(0.0, 0.5, 0.5) == 0.5
    assert M.cepo_lambda(0.25, 0.5, 0.5) == pytest.approx(0.25)
    assert M.cepo_lambda(0.5, 0.5, 0.5) == 0.0 and M.cepo_lambda(0.9, 0.5, 0.5) == 0.0
    assert M.cepo_lambda(0.9, 0.5, None) == 0.5


def _ex(sid, adv, teacher, negative, behaviour=None):
    n = len(teacher)
    return Example(
        sample_id=sid, prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)),
        behaviour_logp=np.asarray(behaviour or [-1.0] * n, np.float32),
        teacher_logp=np.asarray(teacher, np.float32), topk_ids=np.zeros((n, 2), np.int32),
        topk_logp=np.log(np.full((n, 2), 0.25, np.float32)), tail=np.full(n, 0.5, np.float32),
        group="g", passed=adv > 0, advantage=adv, negative_logp=np.asarray(negative, np.float32))


def _cfg(**rewards) -> TrainConfig:
    return TrainConfig.model_validate({"objective": "none", "rewards": {
        "rl_weight": 2.0, "ppo_clip": 0.2, "credit": "cepo", "cepo_lambda": 0.5,
        "cepo_decay_fraction": 0.5, "cepo_clip": 0.5, **rewards}})


def test_reward_coefficients_carry_the_credit_and_lose_it_as_lambda_decays():
    b = collate([_ex("a", 0.7, [-1.0, -0.5, -2.0], [-1.0, -1.5, -1.9]),
                 _ex("b", -0.7, [-1.0, -0.2], [-1.3, -1.0])], 0)
    contrast = [0.0, 1.0, -0.1, 0.3, 0.8]
    adv = [0.7] * 3 + [-0.7] * 2
    for progress, lam in [(0.0, 0.5), (0.2, 0.3), (0.6, 0.0)]:
        coef = token_coefficients(b, _cfg(), progress=progress)
        want = [2.0 * a * _paper(a, c, lam, 0.5) for a, c in zip(adv, contrast)]
        np.testing.assert_allclose(coef.pg_N.numpy(), want, rtol=1e-5)
        assert coef.info["cepo_lambda"] == pytest.approx(lam)
    plain = token_coefficients(b, TrainConfig.model_validate(
        {"objective": "none", "rewards": {"rl_weight": 2.0, "ppo_clip": 0.2}}))
    np.testing.assert_allclose(plain.pg_N.numpy(), [2.0 * a for a in adv], rtol=1e-6)


def test_gradient_through_the_clipped_surrogate_equals_the_closed_form():
    """loss = Σ_t −min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t), ρ_t = πS(y_t)/πbehaviour(y_t): inside
    the band ∂loss/∂z_t = −ρ_t Â_t (e_y − softmax(z_t)); zero once ρ left it in Â's direction."""
    torch.manual_seed(0)
    T, V = 6, 5
    z = torch.randn(T, V, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4, 2, 2])
    logp_now = torch.log_softmax(z, -1)[torch.arange(T), y]
    # behaviour log-probs put ρ in, below and above the band
    behaviour = logp_now.detach() - torch.log(torch.tensor([1.0, 1.5, 0.5, 1.0, 1.5, 0.5],
                                                           dtype=torch.float64))
    adv = torch.tensor([0.9, 0.9, 0.9, -0.9, -0.9, -0.9], dtype=torch.float64)
    contrast = torch.tensor([0.4, -1.2, 0.0, 0.7, 0.1, -0.3], dtype=torch.float64)
    eps = 0.2
    coef = 1.0 * adv * M.cepo_credit(adv, contrast, 0.5, 0.5)
    zz = z.clone().requires_grad_()
    lp = torch.log_softmax(zz, -1)[torch.arange(T), y]
    D.policy_gradient(lp, behaviour, coef, ppo_clip=eps).sum().backward()
    expected = torch.zeros(T, V, dtype=torch.float64)
    for t in range(T):
        a_hat = adv[t].item() * _paper(adv[t].item(), contrast[t].item(), 0.5, 0.5)
        rho = math.exp(logp_now[t].item() - behaviour[t].item())
        clipped = (a_hat > 0 and rho > 1 + eps) or (a_hat < 0 and rho < 1 - eps)
        if clipped:
            continue
        p = torch.softmax(z[t], -1)
        onehot = torch.zeros(V, dtype=torch.float64)
        onehot[y[t]] = 1.0
        expected[t] = -rho * a_hat * (onehot - p)
    torch.testing.assert_close(zz.grad, expected)
    assert (zz.grad[1] == 0).all() and (zz.grad[5] == 0).all()  # ρ left the band


def test_rejected_sibling_is_the_worst_failing_other_reply_never_the_sample():
    r = {"sample_id": ["a#0", "a#1", "a#2", "a#3", "b#0", "b#1", "c#0"],
         "row_id": ["a", "a", "a", "a", "b", "b", "c"],
         "passed": [True, False, False, True, False, True, False],
         "reward": [1.0, 0.0, 0.0, 1.0, 0.2, 1.0, 0.0],
         "text": ["ok0", "bad1", "bad2", "ok3", "bad", "ok", "lonely"]}
    got = rejected_siblings(r)
    assert got["a#0"] == ("a#1", "bad1") and got["a#3"] == ("a#1", "bad1")  # tie: the earlier
    assert got["a#1"] == ("a#2", "bad2") and got["a#2"] == ("a#1", "bad1")  # never itself
    assert got["b#1"] == ("b#0", "bad") and got["b#0"] is None  # its only failing reply is itself
    assert got["c#0"] is None


def test_config_refuses_cepo_without_its_negative_pass_or_advantage():
    base = {"mode": "online", "teacher": {"kind": "live", "context": {"views": ["solution"]}},
            "train": {"objective": "none", "rewards": {"rl_weight": 1.0, "credit": "cepo"}}}
    with pytest.raises(Exception, match="negative_view"):
        PipelineConfig.model_validate(base)
    ok = {**base, "teacher": {**base["teacher"], "negative_view": "solution"}}
    assert PipelineConfig.model_validate(ok).teacher.negative_view == "solution"
    with pytest.raises(Exception, match="must be one of teacher.context.views"):
        PipelineConfig.model_validate({**ok, "teacher": {**ok["teacher"], "negative_view": "answer"}})
    with pytest.raises(Exception, match="rl_weight"):
        TrainConfig.model_validate({"rewards": {"credit": "cepo"}})
    # off by default, and out of the content key then
    assert "credit" not in TrainConfig().rewards.key_dict()
