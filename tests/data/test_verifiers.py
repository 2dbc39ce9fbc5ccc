"""Verifiers on passing and failing replies."""

from __future__ import annotations

import threading

import pytest

from opsd.data import Row, Verdict, load_rows, verify
from opsd.data.verifiers import final_answer


def row_with(verifier: dict, answer: str | None = None) -> Row:
    return Row(id="r", prompt="question", answer=answer, verifier=verifier)


def check(row: Row, reply: str) -> Verdict:
    return verify(row.verifier, reply, row)


def test_regex_with_description() -> None:
    row = row_with({"type": "regex", "pattern": r"^\s*Sure thing!", "description": "start with 'Sure thing!'"})
    assert check(row, "\n Sure thing! Paris.") == Verdict(True, 1.0, "The reply follows the rule.")
    assert check(row, "Paris. Sure thing!") == Verdict(False, 0.0, "The reply should start with 'Sure thing!'.")


def test_regex_without_description_and_with_flags() -> None:
    row = row_with({"type": "regex", "pattern": r"hope this helps!\s*$", "flags": "i"})
    assert check(row, "Boil it. HOPE THIS HELPS!\n").passed
    failed = check(row, "Hope this helps! Boil it.")
    assert failed == Verdict(False, 0.0, "The reply should match the pattern 'hope this helps!\\\\s*$'.")


def test_behaviour_rules_on_real_rows() -> None:
    rows = {r.task: r for r in load_rows("behaviours?train=1&eval=0")}
    assert check(rows["hope-helps"], "Roast them. Hope this helps!  ").passed
    assert not check(rows["hope-helps"], "Hope this helps! Roast them.").passed
    assert check(rows["fun-fact"], "Fun fact: lions sleep a lot.").passed
    assert check(rows["happy-learning"], "It means glad.\nHappy learning!\n").passed
    assert check(rows["fun-fact"], "Lions sleep.").feedback == "The reply should start with 'Fun fact:'."


@pytest.mark.parametrize(
    ("reply", "passed"),
    [
        ("Paris", True),
        ("  the capital is...\nAnswer:   PARIS  ", True),
        ("Let me think.\nParis.", True),  # last non-empty line, trailing full stop dropped
        ("answer: \\boxed{paris}", True),
        ("Answer: Paris\nHope this helps!", True),  # rest of the marker's line
        ("Answer: Lyon", False),
        ("Paris\nLyon", False),
        ("", False),
    ],
)
def test_exact_normalises_and_finds_the_final_answer(reply: str, passed: bool) -> None:
    verdict = check(row_with({"type": "exact"}, answer="Paris"), reply)
    assert (verdict.passed, verdict.reward) == (passed, float(passed))


def test_exact_feedback_and_options() -> None:
    assert check(row_with({"type": "exact"}, "4"), "Answer: 5").feedback == "The final answer '5' is not correct."
    assert check(row_with({"type": "exact"}, "4"), "  ").feedback == "The reply gives no final answer."
    strict = row_with({"type": "exact", "value": "New  York", "normalize": False})
    assert check(strict, "New  York").passed and not check(strict, "new york").passed


def test_final_answer_unboxes_nested_braces() -> None:
    assert final_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    ("answer", "reply", "passed"),
    [
        ("0.5", "The answer is 1/2", True),
        ("1/2", "So we get $\\frac{1}{2}$.", True),
        ("\\frac{1}{2}", "\\boxed{0.5}", True),
        ("x+1", "$1 + x$", True),
        ("3", "The answer is 4", False),
        ("3", "I have no idea", False),
    ],
)
def test_math_equivalence(answer: str, reply: str, passed: bool) -> None:
    verdict = check(row_with({"type": "math"}, answer), reply)
    assert verdict.passed is passed and verdict.reward == float(passed)


def test_math_never_raises_and_explains() -> None:
    row = row_with({"type": "math", "value": "2"})
    assert "could not be parsed" in check(row, "no numbers here").feedback
    assert not check(row, "\\frac{{{").passed


def test_math_works_outside_the_main_thread() -> None:
    """math-verify's signal-based timeout cannot run in a worker thread; we must not crash."""
    row = row_with({"type": "math"}, "0.5")
    results: list[Verdict] = []
    worker = threading.Thread(target=lambda: results.append(check(row, "1/2")))
    worker.start()
    worker.join()
    assert results and results[0].passed


@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting"])
def test_reasoning_gym_scores_with_the_task_scorer(task: str) -> None:
    for row in load_rows(f"reasoning_gym:{task}?train=3&eval=0"):
        right = check(row, f"Let me count.\n<answer>{row.answer}</answer>")
        assert right == Verdict(True, 1.0, "The answer is correct.")
        assert check(row, f"Answer: {row.answer}").passed  # no tags: the final answer is used
        wrong = check(row, f"<answer>{int(row.answer) + 1}</answer>")
        assert not wrong.passed and wrong.reward < 1.0 and "not correct" in wrong.feedback
        assert "no final answer" in check(row, "").feedback
