"""BRTS (Zhang et al. 2026, arXiv:2605.09725): best-of-N teacher replies chosen correct first,
then most student-likely, with the ground-truth recovery step — the choice against a brute-force
ranking, the sampling/recovery flow on a scripted teacher, and the teacher-context weight in the
loss coefficients. The end-to-end run is
tests/test_online_recipes.py::test_online_recipe_runs_end_to_end[brts]."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from opsd.stages import rollout as rollout_stage

from opsd.backends.hf import Generation, SamplingParams
from opsd.config import BRTSConfig, PipelineConfig, TrainConfig
from opsd.data.rows import Row
from opsd.objectives.plan import token_coefficients
from opsd.selection import Candidate, choose
from opsd.training.batches import Example, collate


def _reference(cands: list[Candidate], fallback: str) -> tuple[int, int | None]:
    """Brute force: rank every candidate by (tier has a passing reply first, own tier first,
    passed first, higher ℓ first, earlier first) over all of them; 3/skip when none passed."""
    passing = [i for i, c in enumerate(cands) if c.passed]
    if passing:
        first_tier = min(cands[i].tier for i in passing)
        pool = [i for i in passing if cands[i].tier == first_tier]
        return first_tier, sorted(pool, key=lambda i: (-cands[i].student_logp, i))[0]
    tier1 = [i for i, c in enumerate(cands) if c.tier == 1]
    if fallback == "skip" or not tier1:
        return 0, None
    return 3, sorted(tier1, key=lambda i: (-cands[i].student_logp, i))[0]


def test_choice_matches_a_brute_force_ranking_ties_included():
    rng = random.Random(0)
    for _ in range(2000):
        n1, n2 = rng.randint(1, 4), rng.randint(0, 3)
        # few distinct log-likelihoods: ties are common
        cands = [Candidate(1 if i < n1 else 2, rng.random() < 0.3, rng.choice([-1.0, -2.0, -0.5]))
                 for i in range(n1 + n2)]
        for fallback in ("most_likely", "skip"):
            got = choose(cands, fallback)
            assert (got.tier, got.index) == _reference(cands, fallback), (cands, fallback)


def test_choice_by_hand():
    c = [Candidate(1, False, -0.1), Candidate(1, True, -2.0), Candidate(1, True, -1.0),
         Candidate(1, True, -1.0)]
    got = choose(c)
    # correct first (index 0 is the most likely but fails), then most likely, tie -> earlier
    assert (got.tier, got.index) == (1, 2) and "3 of 4" in got.reason
    rec = [Candidate(1, False, -0.1), Candidate(1, False, -3.0), Candidate(2, True, -5.0)]
    assert (choose(rec).tier, choose(rec).index) == (2, 2)  # a recovered correct beats likely
    none = [Candidate(1, False, -3.0), Candidate(1, False, -0.2), Candidate(2, False, -0.1)]
    assert (choose(none).tier, choose(none).index) == (3, 1)  # fallback: tier 1 only
    assert choose(none, "skip").index is None and choose(none, "skip").tier == 0


class Letters:
    """Token i is the letter chr(97 + i): replies are readable strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


class ScriptedTeacher:
    """The teacher's replies per prompt (keyed by the prompt's first id), scripted."""

    def __init__(self, replies: dict[int, list[str]]):
        self.replies, self.calls = replies, []

    def generate(self, prompts, params):
        self.calls.append(([p[0] for p in prompts], params))
        return [Generation(p, s, [ord(c) - 97 for c in self.replies[prompt[0]][s]],
                           [-0.3] * len(self.replies[prompt[0]][s]), "stop")
                for p, prompt in enumerate(prompts) for s in range(params.n)]


def _row(i: int) -> Row:
    return Row.model_validate({"id": f"q{i}", "prompt": "?", "task": "t",
                               "verifier": {"type": "regex", "pattern": "^yes"}})


def test_replies_recovery_and_records(monkeypatch):
    # the student's likelihood of a reply: minus its number of 'z's (so 'yesz' < 'yes')
    def fake_logprobs(model, contexts, responses, **kw):
        return [torch.full((len(r),), -float(sum(t == 25 for t in r)) / max(1, len(r)))
                for r in responses]

    monkeypatch.setattr(rollout_stage, "sequence_logprobs", fake_logprobs)
    rows = [_row(0), _row(1), _row(2), _row(3)]
    teacher = ScriptedTeacher({
        10: ["yesz", "yes", "no"],      # q0: two pass; the more student-likely one is kept
        11: ["no", "nz", "nzz"],        # q1: none passes -> recovery (20) -> 'yesss' passes
        12: ["nzz", "n", "nope"],       # q2: none passes, recovery fails -> most likely tier 1
        13: ["nah", "nzz", "n"],        # q3: none passes, no ground truth -> no recovery
        21: ["yesss"], 22: ["zz"],
    })
    contexts = [[10], [11], [12], [13]]
    recovery = [[20], [21], [22], [13]]  # q3's recovery prompt is its own: nothing to show
    cfg = BRTSConfig(n=3, recovery_tries=1, temperature=0.7, top_p=0.9)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    kept, records = rollout_stage.brts_replies(rows, [[1]] * 4, contexts, recovery, teacher,
                                               object(), Letters(), params, cfg, sample_index=2)
    (first, p1), (second, p2) = teacher.calls
    assert first == [10, 11, 12, 13] and p1.n == 3 and p1.temperature == 0.7 and p1.top_p == 0.9
    assert second == [21, 22] and p2.n == 1  # only failing prompts with a ground truth to show
    assert p1.seed != params.seed and p2.seed != p1.seed
    texts = [Letters().decode(g.response_ids) for g in kept]
    # q2 and q3: ties in likelihood ('n' / 'nope', 'nah' / 'n') keep the earlier reply
    assert texts == ["yes", "yesss", "n", "nah"]
    assert [r["tier"] for r in records] == [1, 2, 3, 3]
    assert [r["chosen"] for r in records] == [1, 3, 1, 0]
    assert all(g.sample_index == 2 and g.guided == list(range(len(g.response_ids))) for g in kept)
    assert [g.prompt_index for g in kept] == [0, 1, 2, 3]
    assert records[0]["sample_id"] == "q0#2"
    assert [c["passed"] for c in records[1]["candidates"]] == [False, False, False, True]
    assert records[1]["candidates"][3]["tier"] == 2 and records[1]["candidates"][3]["text"] == "yesss"
    assert "recovery" in records[1]["reason"]
    # skip: nothing kept where nothing passed
    cfg_skip = BRTSConfig(n=3, recovery_tries=0, fallback="skip")
    kept, records = rollout_stage.brts_replies(rows, [[1]] * 4, contexts, recovery, teacher,
                                               object(), Letters(), params, cfg_skip, sample_index=2)
    assert [Letters().decode(g.response_ids) for g in kept] == ["yes"]
    assert [r["sample_id"] for r in records] == ["q0#2", None, None, None]


def _ex(sid, n, weight=1.0, teacher_written=False):
    return Example(sample_id=sid, prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)),
                   behaviour_logp=np.full(n, -1.0, np.float32), teacher_logp=np.full(n, -1.0, np.float32),
                   topk_ids=np.zeros((n, 2), np.int32), topk_logp=np.log(np.full((n, 2), 0.25, np.float32)),
                   tail=np.full(n, 0.5, np.float32), group="g", sample_weight=weight,
                   teacher_written=teacher_written)


def test_teacher_context_branch_is_weighted_lambda_and_left_out_of_the_grpo_group():
    from opsd.stages.train import attach_group_stats

    b = collate([_ex("g#0", 2), _ex("g#2", 3, 0.05, True)], 0)
    c = token_coefficients(b, TrainConfig.model_validate({"weighting": {"teacher_reply": 0.05}}))
    np.testing.assert_allclose(c.distill_N.numpy(), [1, 1, 0.05, 0.05, 0.05], rtol=1e-6)
    exs = [_ex("g#0", 2), _ex("g#1", 2), _ex("g#2", 2, 0.05, True)]
    for e, r in zip(exs, [1.0, 0.0, 1.0]):
        e.reward = r
    attach_group_stats(exs, TrainConfig())
    # the teacher's reply neither gets an advantage nor shifts the student's group mean
    assert exs[2].advantage == 0.0
    assert exs[0].advantage == pytest.approx(-exs[1].advantage) and exs[0].advantage > 0.5


def test_config_needs_the_hf_backend_and_keeps_old_keys_when_off():
    assert "brts" not in PipelineConfig().rollout.key_dict()
    assert "teacher_reply" not in TrainConfig().weighting.key_dict()
    on = PipelineConfig.model_validate({"rollout": {"brts": {"n": 2}}})
    assert on.rollout.needs_teacher() and on.rollout.needs_teacher_model()
    with pytest.raises(Exception, match="brts needs rollout.backend=hf"):
        PipelineConfig.model_validate({"rollout": {"backend": "vllm", "brts": {"n": 2}}})
    with pytest.raises(Exception, match="unknown view"):
        BRTSConfig(n=2, recovery_views=["hint"])
