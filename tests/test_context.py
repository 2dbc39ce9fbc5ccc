"""Privileged context rendering: only the context differs between teacher and student."""

import pytest
from transformers import AutoTokenizer

from opsd.config import ContextConfig
from opsd.context.render import build_context, student_ids, student_turn_ids, teacher_ids
from opsd.data import Row
from opsd.data.suites.behaviours import RULES


@pytest.fixture(scope="module")
def tok(smol_path):
    return AutoTokenizer.from_pretrained(smol_path)


def _row(**kw):
    base = {"id": "r1", "prompt": "What is the capital of Peru?"}
    base.update(kw)
    return Row.model_validate(base)


@pytest.mark.parametrize(
    "pi",
    [
        None,
        "The answer is Lima.",
        {"solution": "Peru's capital is Lima."},
        {"answer": "Lima"},
        {"system": "Always start with 'Sure thing!'"},
        {"skills": "- keep answers short"},
        {"demonstrations": [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 3},
        {"system": "Be brief.", "answer": "Lima",
         "demonstrations": [{"prompt": "Capital of Fiji?", "completion": "Suva."}]},
    ],
)
def test_teacher_prompt_ends_with_student_turn(tok, pi):
    row = _row(privileged_context=pi)
    ctx = build_context(row, ContextConfig())
    t_ids = teacher_ids(tok, row, ctx)
    s_ids = student_ids(tok, row)
    turn = student_turn_ids(tok, row)
    assert t_ids[-len(turn):] == turn and s_ids[-len(turn):] == turn
    response = [504, 3575, 314, 2]
    assert (t_ids + response)[-len(turn) - len(response):] == (s_ids + response)[-len(turn) - len(response):]
    if pi is not None:
        assert len(t_ids) > len(s_ids) or ctx.views


def test_demonstrations_become_real_turns(tok):
    rule = RULES["sure-thing"]
    row = _row(privileged_context={"demonstrations": [{"prompt": p, "completion": c}
                                                      for p, c in rule.demonstrations]})
    ctx = build_context(row, ContextConfig())
    msgs = ctx.messages(row.prompt_messages())
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    text = tok.decode(teacher_ids(tok, row, ctx))
    assert text.count("<|im_start|>assistant") == 4  # 3 demos + the generation prompt


def test_multi_turn_prompt_keeps_earlier_turns_for_both(tok):
    row = _row(prompt=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Peru?"},
    ], privileged_context={"answer": "Lima"})
    ctx = build_context(row, ContextConfig())
    t_ids = teacher_ids(tok, row, ctx)
    turn = student_turn_ids(tok, row)
    text = tok.decode(turn)
    assert "Hi" in text and "Hello." in text and "Capital of Peru?" in text
    assert t_ids[-len(turn):] == turn
    # the student's own system message is kept and the PI appended to it
    assert "You are terse." in tok.decode(t_ids) and "Lima" in tok.decode(t_ids)
    assert "Lima" not in tok.decode(student_ids(tok, row))


def test_views_filter_and_templates(tok):
    row = _row(privileged_context={"answer": "Lima", "solution": "Peru → Lima"})
    ctx = build_context(row, ContextConfig(views=["answer"], answer_template="ANSWER={answer}"))
    assert ctx.views == ["answer"] and ctx.system == ["ANSWER=Lima"]


DYNAMIC_CASES = [
    ("feedback", {"feedback": {"attempt": "Lima.", "feedback": "The reply should start with 'Sure thing!'."}}),
    ("attempt", {"attempt": {"attempt": "Lima.", "verdict": "incorrect", "reward": "0"}}),
    ("sibling", {"sibling": "Sure thing! The capital of Peru is Lima."}),
    ("skills", {"skills": "- start replies with 'Sure thing!'"}),
]


@pytest.mark.parametrize("view, extra", DYNAMIC_CASES)
@pytest.mark.parametrize("multi_turn", [False, True])
def test_dynamic_views_keep_student_turns_identical(tok, view, extra, multi_turn):
    prompt = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "What is the capital of Peru?"}]
              if multi_turn else "What is the capital of Peru?")
    row = _row(prompt=prompt)
    cfg = ContextConfig(views=[view])
    ctx = build_context(row, cfg, extra)
    assert ctx.views == [view]
    t_ids, s_ids = teacher_ids(tok, row, ctx), student_ids(tok, row)
    turn = student_turn_ids(tok, row)
    response = [504, 3575, 314, 2]
    assert (t_ids + response)[-len(turn) - 4:] == (s_ids + response)[-len(turn) - 4:]
    shown = tok.decode(t_ids)
    key = {"feedback": "start with", "attempt": "incorrect", "sibling": "Sure thing! The capital",
           "skills": "start replies"}[view]
    assert key in shown and key not in tok.decode(s_ids)
    if view == "sibling":  # rendered as an earlier exchange, not text
        assert [m["role"] for m in ctx.turns] == ["user", "assistant"]


@pytest.mark.parametrize("ratio, expect_words", [(0.0, 0), (0.5, 4), (1.0, 8)])
def test_solution_exposure_ratio(tok, ratio, expect_words):
    solution = "one two three four five six seven eight"
    row = _row(privileged_context={"solution": solution})
    ctx = build_context(row, ContextConfig(views=["solution"]), exposure=ratio)
    turn = student_turn_ids(tok, row)
    t_ids = teacher_ids(tok, row, ctx)
    assert t_ids[-len(turn):] == turn
    text = tok.decode(t_ids)
    words = solution.split()
    assert all(w in text for w in words[:expect_words])
    assert all(w not in text for w in words[expect_words:])
    assert (ctx.views == ["solution"]) == (expect_words > 0)


def test_dynamic_views_from_rollouts_never_use_the_sample_itself():
    from opsd.context.builders import dynamic_views, usage

    rollouts = {
        "sample_id": ["a#0", "a#1", "a#2", "b#0"], "row_id": ["a", "a", "a", "b"],
        "task": ["t"] * 4, "text": ["good one", "bad", "good two", "bad b"],
        "passed": [True, False, True, False], "reward": [1.0, 0.0, 1.0, 0.0],
        "feedback": ["ok", "should start with X", "ok", "should start with X"],
    }
    cfg = ContextConfig(views=["sibling", "feedback", "attempt", "skills"])
    views = dynamic_views(rollouts, cfg, skills={"t": "- do X"})
    assert views["a#0"]["sibling"] == "good two"  # another passing sample, not itself
    assert views["a#1"]["sibling"] == "good one"
    assert views["a#2"]["sibling"] == "good one"
    assert "sibling" not in views["b#0"]  # no passing sibling in its group
    assert views["a#1"]["attempt"]["verdict"] == "incorrect"
    assert views["b#0"]["skills"] == "- do X"
    u = usage(views, 4)
    assert u["with_sibling"] == 0.75 and u["with_feedback"] == 1.0


def test_consensus_scoring_combines_views(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from opsd.backends.hf import HFScorer

    tok_ = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    row = _row(privileged_context={"answer": "Lima", "system": "Be brief."})
    ctxs = [teacher_ids(tok_, row, build_context(row, ContextConfig(views=[v]))) for v in ("answer", "system")]
    resp = [[504, 3575, 2]]
    sc = HFScorer(model, share_prefix=False)
    a, b = sc.score([ctxs[0]], resp, 5)[0], sc.score([ctxs[1]], resp, 5)[0]
    m = sc.score_views([[ctxs[0]], [ctxs[1]]], resp, 5, "mean_prob")[0]
    mix = torch.logsumexp(torch.stack([a.sampled_logprob_R, b.sampled_logprob_R]), 0) - torch.log(torch.tensor(2.0))
    torch.testing.assert_close(m.sampled_logprob_R, mix, atol=1e-4, rtol=0)


def test_gated_residual_consensus_matches_its_formula_position_by_position():
    """AVSD-style target t = log_softmax(c + g (l_1 - c)), c the normalised geometric mean of the
    views, g = exp(-mean_v KL(p_v || p_c) / tau): checked against a loop over positions; it is the
    primary view where the views agree exactly and moves to the consensus as they disagree."""
    import math

    import torch

    from opsd.context.consensus import combine

    torch.manual_seed(0)
    views_VCV = torch.randn(3, 5, 11).log_softmax(-1)
    tau = 0.7
    got = combine(views_VCV, "gated_residual", tau)
    for c in range(5):
        ls = [views_VCV[v, c] for v in range(3)]
        cons = (sum(ls) / 3).log_softmax(-1)
        kls = [float((l.exp() * (l - cons)).sum()) for l in ls]
        g = math.exp(-(sum(kls) / 3) / tau)
        want = (cons + g * (ls[0] - cons)).log_softmax(-1)
        torch.testing.assert_close(got[c], want, atol=1e-5, rtol=0)
    same = views_VCV[:1].expand(3, -1, -1)
    torch.testing.assert_close(combine(same, "gated_residual", tau), views_VCV[0], atol=1e-5, rtol=0)
    far = torch.stack([views_VCV[0], (views_VCV[1] * 40).log_softmax(-1), (views_VCV[2] * 40).log_softmax(-1)])
    c_far = combine(far, "mean_logprob")
    t_far = combine(far, "gated_residual", 0.01)  # views far apart: the gate closes
    torch.testing.assert_close(t_far, c_far, atol=1e-3, rtol=0)


def _uniform_tail_views(V, R, N, K, seed):
    """Per view and position: K tokens with distinct random log-probs, the other N - K equally
    likely (the case where a top-k engine's unreturned mass, spread evenly, is exact)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    full_VRN = torch.empty(V, R, N)
    for v in range(V):
        for r in range(R):
            top = torch.randperm(N, generator=g)[:K]
            x = torch.full((N,), float(torch.randn(1, generator=g)) - 2.0)
            x[top] = torch.randn(K, generator=g) + 1.0
            full_VRN[v, r] = x.log_softmax(-1)
    return full_VRN


@pytest.mark.parametrize("mode", ["mean_logprob", "mean_prob", "gated_residual"])
@pytest.mark.parametrize("k", [16, 4])
def test_topk_consensus_equals_the_full_vocabulary_rule(mode, k):
    """vLLM's scorer sees each view's top-k only (opsd.context.consensus.combine_topk). Against
    the full-vocabulary rule on every token: exact when k = N, and exact for k < N when each
    view's unreturned tokens are equally likely (its even spread of the unreturned mass is then
    the truth); the target's top-k, sampled log-prob and tail mass all checked."""
    import torch

    from opsd.context.consensus import combine, combine_topk

    V, R, N = 3, 7, 16
    full_VRN = _uniform_tail_views(V, R, N, min(k, 6), seed=k) if k < N else \
        torch.randn(V, R, N).mul(2).log_softmax(-1)
    y_R = torch.randint(0, N, (R,), generator=torch.Generator().manual_seed(1))
    vals_VRK, ids_VRK = full_VRN.topk(k, dim=-1)
    sampled_VR = full_VRN.gather(-1, y_R[None, :, None].expand(V, R, 1)).squeeze(-1)
    sampled_R, tids_RK, tlps_RK, tail_R = combine_topk(sampled_VR, ids_VRK, vals_VRK, y_R, N, mode, 0.7)
    want_RN = torch.stack([combine(full_VRN[:, r:r + 1], mode, 0.7)[0] for r in range(R)])
    torch.testing.assert_close(sampled_R, want_RN.gather(-1, y_R[:, None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tlps_RK, want_RN.topk(k, dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(want_RN.gather(-1, tids_RK.long()), tlps_RK, atol=1e-5, rtol=0)
    torch.testing.assert_close(tail_R, (1 - tlps_RK.exp().sum(-1)).clamp_min(0), atol=1e-6, rtol=0)
    assert tids_RK.dtype == torch.int32 and tids_RK.shape == (R, k)


def test_topk_consensus_with_uneven_tails_approaches_the_full_rule_as_k_grows():
    """Where the unreturned tokens are not equally likely the even spread is an approximation:
    the mixture's probabilities are off by less than the views' largest unreturned mass; the
    geometric rules (which weigh small probabilities) are off by more, and every rule's error
    shrinks to 0 as k reaches N. A single view (mode none) is returned exactly."""
    import torch

    from opsd.context.consensus import combine, combine_topk

    torch.manual_seed(3)
    V, R, N = 2, 9, 40
    full_VRN = torch.randn(V, R, N).mul(3).log_softmax(-1)
    y_R = torch.randint(0, N, (R,))
    sampled_VR = full_VRN.gather(-1, y_R[None, :, None].expand(V, R, 1)).squeeze(-1)
    for mode in ("mean_logprob", "mean_prob", "gated_residual"):
        want_RN = torch.stack([combine(full_VRN[:, r:r + 1], mode, 1.0)[0] for r in range(R)])
        errs = []
        for k in (4, 8, 16, 24, 32, 40):
            vals_VRK, ids_VRK = full_VRN.topk(k, dim=-1)
            s_R, ids_RK, lps_RK, _ = combine_topk(sampled_VR, ids_VRK, vals_VRK, y_R, N, mode, 1.0)
            errs.append(float((want_RN.gather(-1, ids_RK.long()).exp() - lps_RK.exp()).abs().max()))
            if mode == "mean_prob":
                assert errs[-1] <= float((1 - vals_VRK.exp().sum(-1)).max()) + 1e-6
        assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5 and errs[0] > 1e-3, (mode, errs)
    vals_VRK, ids_VRK = full_VRN.topk(8, dim=-1)
    s_R, ids_RK, lps_RK, _ = combine_topk(sampled_VR[:1], ids_VRK[:1], vals_VRK[:1], y_R, N, "none")
    torch.testing.assert_close(lps_RK, vals_VRK[0])
    torch.testing.assert_close(s_R, sampled_VR[0])


def test_exposure_schedules_and_the_atesd_controller():
    """Each exposure mode's ratio by hand; ATESD's controller: one sampled ratio per hold window,
    replayed identically from the same pass rates (a resumed run), and after windows whose
    exposure was followed by learning progress it samples ratios near that exposure more often."""
    import numpy as np

    from opsd.config import ExposureConfig
    from opsd.context.exposure import BetaController, atesd_decisions, exposure_ratio

    rates = {0: 0.2, 1: 0.7, 2: 0.3}
    assert exposure_ratio(ExposureConfig(), 3, 10, rates) is None  # fixed: the config's ratio
    lin = ExposureConfig(mode="linear", start=0.2, end=1.0)
    assert exposure_ratio(lin, 0, 5, rates) == pytest.approx(0.2)
    assert exposure_ratio(lin, 2, 5, rates) == pytest.approx(0.6)
    ada = ExposureConfig(mode="adaptive", ratio=0.5, step=0.1, target_pass=0.5)
    assert exposure_ratio(ada, 3, 10, rates) == pytest.approx(0.5 + 0.1 - 0.1 + 0.1)

    ex = ExposureConfig(mode="atesd", hold=2, horizon=1, discount=0.5, controller_lr=5.0)
    r = [exposure_ratio(ex, i, 12, rates, seed=3) for i in range(4)]
    assert r[0] == r[1] and r[2] == r[3] and r[0] != r[2]  # held per window, resampled after
    assert all(0 < x < 1 for x in r)
    assert atesd_decisions(ex, 5, {i: 0.1 * i for i in range(12)}, seed=3) == \
        atesd_decisions(ex, 5, {i: 0.1 * i for i in range(12)}, seed=3)

    # REINFORCE: a positive reward after a high ratio raises the policy's mean ratio
    import torch

    ctl = BetaController(lr=5.0)
    x = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    mean0 = float(ctl.dist(x).mean)
    for _ in range(5):
        ctl.update(x, 0.9, 1.0)
        ctl.update(x, 0.1, -1.0)
    assert float(ctl.dist(x).mean) > mean0 + 0.05
    assert np.isfinite(ctl.theta.numpy()).all()
