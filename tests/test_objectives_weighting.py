"""Token weighting, selection and reward mixing on hand-built batches (values worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opsd.config import TrainConfig
from opsd.objectives import mixing as M
from opsd.objectives import weighting as W
from opsd.objectives.plan import TokenStats, needs_stats, token_coefficients
from opsd.training.batches import Example, collate


def ex(sid, n, group="g", passed=None, reward=0.0, advantage=0.0, scope=1.0, key=None, err=None,
       teacher=None, behaviour=None):
    return Example(
        sample_id=sid, prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)),
        behaviour_logp=np.asarray(behaviour if behaviour is not None else [-1.0] * n, np.float32),
        teacher_logp=np.asarray(teacher if teacher is not None else [-1.0] * n, np.float32),
        topk_ids=np.zeros((n, 2), np.int32), topk_logp=np.log(np.full((n, 2), 0.25, np.float32)),
        tail=np.full(n, 0.5, np.float32), reward=reward, group=group, passed=passed,
        advantage=advantage, scope_weight=scope,
        key_mask=None if key is None else np.asarray(key, bool),
        error_mask=None if err is None else np.asarray(err, bool),
    )


def cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate(kw)


# --------------------------------------------------------------------------- weighting


def test_position_weights_increase_and_normalise_per_reply():
    tokpos = torch.tensor([0, 1, 2, 3, 0, 1])
    rlen = torch.tensor([4, 4, 4, 4, 2, 2])
    seq = torch.tensor([0, 0, 0, 0, 1, 1])
    lin = W.position_weights(tokpos, rlen, "linear", w_min=0.2)
    torch.testing.assert_close(lin, torch.tensor([0.3, 0.5, 0.7, 0.9, 0.4, 0.8]))
    sig = W.position_weights(tokpos, rlen, "sigmoid", w_min=0.2, tau=0.5, scale=0.1)
    assert torch.all(sig[1:4] > sig[0:3]) and sig[5] > sig[4]
    u0 = 0.125
    assert math.isclose(float(sig[0]), 0.2 + 0.8 / (1 + math.exp(-(u0 - 0.5) / 0.1)), rel_tol=1e-6)
    norm = W.normalize_per_sequence(lin, seq)
    torch.testing.assert_close(norm[:4].mean(), torch.tensor(1.0))
    torch.testing.assert_close(norm[4:].mean(), torch.tensor(1.0))
    torch.testing.assert_close(norm[:4] / norm[0], lin[:4] / lin[0])


def test_iw_opd_weights_by_hand():
    # reply 0: |A| = 1, 1, 2 (total 4, prefixes 0, 1, 2); reply 1: |A| = 3 (prefix 0)
    a = torch.tensor([1.0, 1.0, 2.0, 3.0])
    seq = torch.tensor([0, 0, 0, 1])
    pos = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(W.exclusive_prefix_sum(a, seq, pos), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    w = W.iw_opd_weights(a, seq, pos, gamma=0.5)
    torch.testing.assert_close(w, torch.tensor([1.5, 1.375, 1.25, 1.5]))


def test_skip_first_and_entropy_weights():
    torch.testing.assert_close(W.skip_first(torch.tensor([0, 1, 2, 0, 1]), 2),
                               torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    h = torch.tensor([0.0, 1.0, 2.0, 5.0])
    w = W.entropy_weights(h, tau=1.0, active_N=torch.tensor([True, True, True, False]))
    z = torch.exp(-torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(w, torch.cat([3 * z / z.sum(), torch.zeros(1)]))
    assert w[0] > w[1] > w[2] and w[3] == 0


def test_tip_keeps_uncertain_and_overconfident_tokens():
    h = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    div = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 0.1])
    keep = W.tip_select(h, div, entropy_fraction=0.5, divergence_fraction=1 / 6)
    assert keep.tolist() == [True, True, True, False, True, False]
    torch.testing.assert_close(W.selection_weights(keep), keep.float() * 1.5)


# --------------------------------------------------------------------------- mixing


def test_group_advantages_by_hand():
    adv = M.group_advantages([1.0, 0.0, 1.0, 1.0, 0.3], ["a", "a", "b", "b", "c"], eps=0.0)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    np.testing.assert_allclose(adv, [0.5 / s, -0.5 / s, 0.0, 0.0, 0.0])


def test_scope_weights_by_hand():
    # group a: two failed replies with teacher log-PPL 1 and 2; one passed with student log-PPL 0.5
    w = M.scope_weights([1.0, 2.0, 9.0], [0.0, 0.0, 0.5], [False, False, True], ["a", "a", "a"], tau=1.0)
    e = np.exp([-1.0, -2.0])
    np.testing.assert_allclose(w, [2 * e[0] / e.sum(), 2 * e[1] / e.sum(), 1.0])
    assert M.sequence_log_ppl(np.log([0.5, 0.25])) == pytest.approx(-np.log([0.5, 0.25]).mean())


def test_anneal_schedule():
    assert M.anneal(0.0, 2.0, 0.5, 0.25) == 2.0
    assert M.anneal(0.5, 2.0, 0.5, 0.25) == 2.0
    assert M.anneal(0.625, 2.0, 0.5, 0.25) == pytest.approx(1.0)
    assert M.anneal(0.9, 2.0, 0.5, 0.25) == 0.0


def test_spans_to_tokens():
    offsets = [(0, 4), (4, 10), (10, 11), (11, 20)]
    spans = M.char_spans("Sure thing! Paris is", [r"Sure thing!"])
    assert spans == [(0, 11)]
    assert M.spans_to_token_mask(offsets, spans).tolist() == [True, True, True, False]


def test_token_char_offsets_with_the_real_tokenizer(smol_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path)
    text = "Sure thing! The café is open. Hope this helps!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    offsets = M.token_char_offsets(tok, ids)
    assert offsets[-1][1] == len(tok.decode(ids, skip_special_tokens=True))
    mask = M.spans_to_token_mask(offsets, M.char_spans(text, [r"Hope this helps!\s*$"]))
    marked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert marked.strip() == "Hope this helps!"


def test_row_span_patterns_from_metadata_and_verifier():
    from opsd.data.rows import Row

    row = Row(id="r", prompt="q", verifier={"type": "regex", "pattern": "^Sure", "flags": "i"},
              metadata={"trace": {"key": ["Paris"], "error": ["London"]}})
    key, err = M.row_span_patterns(row, ["x"], [], key_from_verifier=True)
    assert key == ["x", "Paris", "(?i)^Sure"] and err == ["London"]


# --------------------------------------------------------------------------- per-token plans


def test_plain_distillation_has_unit_coefficients():
    b = collate([ex("a", 3), ex("b", 2)], 0)
    c = token_coefficients(b, cfg())
    torch.testing.assert_close(c.distill_N, torch.ones(5))
    assert c.pg_N is None and c.fkl_N is None and c.rkl_N is None
    assert not needs_stats(cfg())


def test_grpo_mixing_and_position_skip():
    b = collate([ex("a", 3, advantage=0.7), ex("b", 2, advantage=-0.7)], 0)
    c = token_coefficients(b, cfg(rewards={"rl_weight": 2.0, "distill_weight": 0.5},
                                  weighting={"skip_first": 1}))
    torch.testing.assert_close(c.pg_N, torch.tensor([1.4, 1.4, 1.4, -1.4, -1.4]))
    torch.testing.assert_close(c.distill_N, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.5]))


def test_srpo_routes_passed_to_grpo_and_failed_to_distillation():
    b = collate([ex("a", 2, passed=True, advantage=0.7), ex("b", 2, passed=False, advantage=-0.7)], 0)
    c = token_coefficients(b, cfg(rewards={"routing": "srpo", "rl_weight": 1.0},
                                  weighting={"entropy": "teacher"}))
    torch.testing.assert_close(c.pg_N, torch.tensor([0.7, 0.7, 0.0, 0.0]))
    # failed tokens: teacher entropy is the same everywhere → weight 1 each
    torch.testing.assert_close(c.distill_N, torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_kepo_gates_distillation_to_passed_replies_and_keeps_grpo_on_all():
    """KEPO: the distillation coefficient is the distill weight on passing replies, 0 on failing
    ones; the reward term is rl_weight x advantage on every token (by hand)."""
    b = collate([ex("a", 2, passed=True, advantage=0.7), ex("b", 3, passed=False, advantage=-0.7)], 0)
    c = token_coefficients(b, cfg(rewards={"routing": "kepo", "rl_weight": 2.0, "distill_weight": 0.5}))
    torch.testing.assert_close(c.pg_N, torch.tensor([1.4, 1.4, -1.4, -1.4, -1.4]))
    torch.testing.assert_close(c.distill_N, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
    # a group with no passing reply gives no distillation at all
    none = collate([ex("c", 2, passed=False, advantage=0.0)], 0)
    assert token_coefficients(none, cfg(rewards={"routing": "kepo", "rl_weight": 1.0})).distill_N is None


def test_scope_routes_and_weights():
    b = collate([ex("a", 2, passed=True, scope=1.5), ex("b", 1, passed=False, scope=0.4)], 0)
    c = token_coefficients(b, cfg(rewards={"routing": "scope", "rl_weight": 1.0}))
    torch.testing.assert_close(c.pg_N, torch.tensor([1.5, 1.5, 0.0]))
    torch.testing.assert_close(c.distill_N, torch.tensor([0.0, 0.0, 0.4]))


def test_trace_routes_spans_and_anneals():
    b = collate([
        ex("a", 3, passed=True, advantage=0.5, key=[True, False, False], err=[False, False, True]),
        ex("b", 3, passed=False, advantage=-0.5, key=[True, False, False], err=[False, True, False]),
    ], 0)
    tc = cfg(objective="forward_kl_topk", rewards={"rl_weight": 1.0},
             trace={"enabled": True, "kl_weight": 2.0, "warmup_fraction": 0.5, "decay_fraction": 0.5})
    c = token_coefficients(b, tc, progress=0.0)
    torch.testing.assert_close(c.fkl_N, torch.tensor([2.0, 0, 0, 0, 0, 0]))  # key span, passed
    torch.testing.assert_close(c.rkl_N, torch.tensor([0.0, 0, 0, 0, 2.0, 0]))  # error span, failed
    torch.testing.assert_close(c.pg_N, torch.tensor([0.0, 0.5, 0.5, -0.5, 0.0, -0.5]))
    assert c.distill_N is None
    late = token_coefficients(b, tc, progress=1.0)
    assert late.fkl_N is None and late.rkl_N is None and late.info["kl_weight"] == 0.0


def test_tip_uses_stats():
    b = collate([ex("a", 4), ex("b", 2)], 0)
    tc = cfg(selection={"mode": "tip", "entropy_fraction": 0.5, "divergence_fraction": 1 / 6})
    assert needs_stats(tc)
    stats = TokenStats(student_entropy_N=torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5]),
                       div_N=torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0, 0.1]))
    c = token_coefficients(b, tc, stats)
    torch.testing.assert_close(c.distill_N, torch.tensor([1.5, 1.5, 1.5, 0.0, 1.5, 0.0]))
    assert c.info["selected_fraction"] == pytest.approx(4 / 6)


def test_config_refusals():
    from pydantic import ValidationError

    from opsd.config import ConfigError, load_config

    with pytest.raises(ValidationError, match="trains nothing"):
        cfg(objective="none")
    with pytest.raises(ValidationError, match="reverse_kl_sampled only"):
        cfg(objective="forward_kl_topk", advantage={"reward_scale": 2.0})
    with pytest.raises(ValidationError, match="rl_weight > 0"):
        cfg(rewards={"routing": "srpo"})
    with pytest.raises(ValidationError, match="extra"):
        cfg(weighting={"positon": "linear"})
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(overrides=["train.temperature=0.7"])
    # online mode takes the live-teacher objectives (OPSD as published); offline, a teacher whose
    # weights follow the student is refused rather than silently frozen
    assert load_config(overrides=["mode=online", "train.objective=jsd",
                                  "teacher.kind=live"]).train.live_teacher
    with pytest.raises(ConfigError, match="teacher.kind=live .*online mode"):
        load_config(overrides=["teacher.kind=live"])
    with pytest.raises(ConfigError, match="teacher.kind=ema .*online mode"):
        load_config(overrides=["teacher.kind=ema"])
    with pytest.raises(ConfigError, match="offline only"):
        load_config(overrides=["mode=online", "rollout.sample_from=teacher"])
    ok = load_config(overrides=["train.temperature=0.7", "train.allow_temperature_mismatch=true"])
    assert ok.train.temperature == 0.7
    assert cfg(objective="jsd").live_teacher and cfg(
        objective="reverse_kl_topk", divergence={"topk_support": "student"}).live_teacher
    assert not cfg(objective="reverse_kl_topk").live_teacher
