"""avg@k / pass@k / maj@k of the evaluate stage against hand-computed cases.

The stage runs for real on the tiny model's tokenizer; its generator is replaced by a scripted one
returning fixed replies (the replies are this test's input, not a component under test), so the
expected figures can be worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import pytest

from opsd.config import EvalConfig
from opsd.data.rows import Row
from opsd.metrics import pass_at_k
from opsd.pool import ModelPool, base_policy
from opsd.stages import evaluate
from opsd.stages.common import StageContext


@dataclass
class Reply:
    prompt_index: int
    sample_index: int
    response_ids: list[int]
    finish_reason: str = "stop"


class Scripted:
    """Greedy reply then the k sampled replies of every prompt, from fixed texts."""

    def __init__(self, tok, greedy: list[str], sampled: list[list[str]]):
        self.tok, self.greedy, self.sampled = tok, greedy, sampled

    def generate(self, prompts, params, progress=None):
        enc = lambda t: self.tok.encode(t, add_special_tokens=False)  # noqa: E731
        if params.n == 1 and params.temperature == 0.0:
            return [Reply(i, 0, enc(t)) for i, t in enumerate(self.greedy)]
        return [Reply(i, j, enc(t)) for i, texts in enumerate(self.sampled)
                for j, t in enumerate(texts)]


def _run(tmp_path, tiny_model_dir, rows, greedy, sampled, k):
    pool, policy = ModelPool(), base_policy(tiny_model_dir)
    engine = Scripted(pool.tokenizer(policy), greedy, sampled)
    ctx = StageContext(out_dir=tmp_path, pool=pool, show_progress=False)
    return evaluate.run(EvalConfig(samples=k), rows, policy, ctx, label="t", engine=engine)


def _rule_row(i):
    return Row.model_validate({"id": f"r{i}", "prompt": "Say hi", "task": "sure",
                               "verifier": {"type": "regex", "pattern": r"^Sure"}})


def _exact_row(i, answer):
    return Row.model_validate({"id": f"e{i}", "prompt": "2+2?", "task": "math", "answer": answer,
                               "verifier": {"type": "exact"}})


def test_pass_at_k_matches_the_combinatorial_definition():
    # 1 - C(n-c, k) / C(n, k): P(at least one of k draws without replacement passes)
    for n, c, k in [(4, 1, 1), (4, 1, 2), (4, 2, 3), (5, 0, 2), (5, 5, 1), (6, 3, 6)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_maj_at_k_of_a_rule_groups_by_verdict_not_by_last_line(tmp_path, tiny_model_dir):
    """Every reply of a rule task is different text: grouping by the last line made each its own
    group and maj@k "did sample 0 pass". With no extracted answer the verdict is the vote."""
    rows = [_rule_row(0), _rule_row(1)]
    sampled = [["Sure thing, one.", "No way two.", "Nope three."],   # 1 of 3 pass: majority fails
               ["Sure, a.", "Nah.", "Sure, c."]]                     # 2 of 3 pass: majority passes
    m = _run(tmp_path, tiny_model_dir, rows, ["Sure.", "No."], sampled, k=3)
    assert m["greedy"]["sure"] == pytest.approx(0.5)
    assert m["avg@3"]["sure"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["pass@3"]["sure"] == pytest.approx(1.0)
    assert m["maj@3"]["sure"] == pytest.approx(0.5)  # row 0 majority fails, row 1 passes


def test_maj_at_k_of_an_answer_task_votes_on_the_extracted_answer(tmp_path, tiny_model_dir):
    rows = [_exact_row(0, "4"), _exact_row(1, "4")]
    sampled = [["Let me see.\nAnswer: 5", "I think\nanswer: 4", "Hmm\nAnswer: 5"],  # majority 5: wrong
               ["It is\nAnswer: 4.", "so answer: 4", "Answer: 3"]]                # majority 4: right
    m = _run(tmp_path, tiny_model_dir, rows, ["Answer: 4", "Answer: 4"], sampled, k=3)
    assert m["avg@3"]["math"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["pass@3"]["math"] == pytest.approx(1.0)
    assert m["maj@3"]["math"] == pytest.approx(0.5)
    assert m["pass@3_macro"] == pytest.approx(1.0)


def test_stated_confidence_reads_the_last_one_as_a_probability():
    from opsd.metrics import stated_confidence

    assert stated_confidence("Answer: 4. Confidence: 0.8") == 0.8
    assert stated_confidence("confidence: 80%") == 0.8
    assert stated_confidence("My confidence level is 35") == 0.35
    assert stated_confidence("Confidence: 0.2 ... on reflection, Confidence = 0.9") == 0.9
    assert stated_confidence("no number here") is None
    assert stated_confidence("Confidence: 250") is None


def test_ece_and_brier_by_hand():
    from opsd.metrics import brier, ece

    conf = [0.9, 0.9, 0.2, 0.6, 1.0]
    ok = [True, False, False, True, True]
    # Brier: (0.01 + 0.81 + 0.04 + 0.16 + 0) / 5
    assert abs(brier(conf, ok) - 1.02 / 5) < 1e-12
    # bins: [0.9, 0.9, 1.0] -> acc 2/3, conf 14/15; [0.2] -> 0 vs 0.2; [0.6] -> 1 vs 0.6
    want = 3 / 5 * abs(2 / 3 - 2.8 / 3) + 1 / 5 * 0.2 + 1 / 5 * 0.4
    assert abs(ece(conf, ok) - want) < 1e-12
    assert ece([1.0, 0.0], [True, False]) == 0.0  # perfectly calibrated extremes


def test_evaluation_reports_calibration_only_when_replies_state_a_confidence():
    from opsd.data.rows import Row
    from opsd.stages.evaluate import metrics_of

    rows = [Row.model_validate({"id": f"r{i}", "prompt": "?", "task": "t",
                                "verifier": {"type": "regex", "pattern": "yes"}}) for i in range(3)]
    cols = {"row_id": ["r0", "r1", "r2"], "greedy": [True] * 3, "passed": [True, False, True],
            "n_tokens": [3, 3, 3], "finish_reason": ["stop"] * 3,
            "text": ["yes. Confidence: 0.9", "no. Confidence: 0.7", "yes"]}
    m = metrics_of(rows, cols, {}, 0)
    assert m["confidence_stated"] == 2 / 3 and abs(m["confidence_mean"] - 0.8) < 1e-12
    assert abs(m["brier"] - (0.01 + 0.49) / 2) < 1e-12 and m["confidence_accuracy"] == 0.5
    assert "ece" not in metrics_of(rows, {**cols, "text": ["yes", "no", "yes"]}, {}, 0)
