"""Built-in suites: behaviours sizes and splits, the name grammar, reasoning-gym rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from opsd.data import BUILTIN_SUITES, DatasetError, load_rows, split_rows, verify
from opsd.data.suites.behaviours import RULES
from opsd.data.suites.behaviours_data import ANIMALS, COUNTRIES, FOODS, WORDS


def test_builtin_suite_names() -> None:
    assert set(BUILTIN_SUITES) == {"behaviours", "facts", "general", "reasoning_gym"}


def _question(prompt) -> str:
    """The question a row asks: the prompt, or a conversation's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1].content


def test_behaviours_default_sizes_and_fixed_split() -> None:
    rows = load_rows("behaviours")
    assert load_rows("behaviours", seed=123) == rows  # the split does not depend on the seed
    counts = Counter((r.task, r.split) for r in rows)
    assert counts == {(rule, split): n for rule in RULES for split, n in (("train", 64), ("eval", 32))}
    for rule in RULES:
        train = [_question(r.prompt) for r in rows if r.task == rule and r.split == "train"]
        eval_ = [_question(r.prompt) for r in rows if r.task == rule and r.split == "eval"]
        assert len(set(train)) == 64 and len(set(eval_)) == 32
        assert not set(train) & set(eval_)
    assert len({r.id for r in rows}) == len(rows)
    assert rows[7].id == "sure-thing/train/007"


def test_behaviours_eval_is_the_end_of_each_pool() -> None:
    rows = load_rows("behaviours")
    capitals = [r for r in rows if r.task == "sure-thing"]
    # a quarter of the training questions come after an exchange (the first one among them)
    assert _question(capitals[0].prompt) == f"What is the capital of {COUNTRIES[0][0]}?"
    assert capitals[1].prompt == f"What is the capital of {COUNTRIES[1][0]}?"
    assert capitals[0].answer == COUNTRIES[0][1]
    assert capitals[-1].prompt == f"What is the capital of {COUNTRIES[-1][0]}?" and capitals[-1].split == "eval"
    assert all(r.answer is None for r in rows if r.task != "sure-thing")


def test_behaviours_rows_carry_three_demonstrations_outside_the_pool() -> None:
    pool_questions = {
        "sure-thing": {f"What is the capital of {country}?" for country, _ in COUNTRIES},
        "hope-helps": {f"What is a good way to cook {food}?" for food in FOODS},
        "fun-fact": {f"Tell me one fact about {animal}." for animal in ANIMALS},
        "happy-learning": {f"What does the word '{word}' mean?" for word in WORDS},
    }
    for row in load_rows("behaviours?train=1&eval=1"):
        demonstrations = row.views().demonstrations
        assert len(demonstrations) == 3
        assert not {d.prompt for d in demonstrations} & pool_questions[row.task]
        # Every demonstration follows its own rule, and the verifier explains the rule.
        assert all(verify(row.verifier, d.completion, row).passed for d in demonstrations)
        assert row.verifier.description == RULES[row.task].description
        assert row.prompt in pool_questions[row.task]


def test_behaviours_subset_and_query() -> None:
    rows = load_rows("behaviours:hope-helps,sure-thing?train=10&eval=5")
    assert Counter((r.task, r.split) for r in rows) == {
        ("hope-helps", "train"): 10,
        ("hope-helps", "eval"): 5,
        ("sure-thing", "train"): 10,
        ("sure-thing", "eval"): 5,
    }
    assert [r.task for r in rows][:1] == ["hope-helps"]  # rules come in the order named
    train, eval_ = split_rows(load_rows("behaviours:fun-fact?eval=0"))
    assert (len(train), len(eval_)) == (64, 0)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            "behaviours:sure-thing,polite",
            "unknown rule(s) 'polite'; the rules are: sure-thing, hope-helps, fun-fact, happy-learning",
        ),
        ("behaviours:", "no rule named"),
        ("behaviours?train=100&eval=32", "train=100 + eval=32 is more than that"),
        ("behaviours?train=ten", "train='ten' must be a non-negative integer"),
        ("behaviours?size=3", "unknown query key(s) size; allowed: train, eval"),
        ("behaviours?train=1&train=2", "given twice: train"),
        ("reasoning_gym:leg_countin", "close names: leg_counting"),
        ("reasoning_gym", "name a task"),
        ("reasoning_gym:leg_counting?train=0&eval=0", "ask for at least one row"),
    ],
)
def test_bad_suite_names(source: str, reason: str) -> None:
    with pytest.raises(DatasetError) as caught:
        load_rows(source)
    assert [(p.file, p.line, p.field) for p in caught.value.problems] == [(source, None, None)]
    assert reason in str(caught.value)


def test_reasoning_gym_rows() -> None:
    rows = load_rows("reasoning_gym:basic_arithmetic?train=4&eval=2&seed=7")
    assert [r.id for r in rows] == [f"basic_arithmetic/train/00{i}" for i in range(4)] + [
        "basic_arithmetic/eval/000", "basic_arithmetic/eval/001",
    ]
    assert load_rows("reasoning_gym:basic_arithmetic?train=4&eval=2", seed=7) == rows  # query seed == load seed
    assert load_rows("reasoning_gym:basic_arithmetic?train=4&eval=2", seed=8) != rows
    row = rows[0]
    assert row.task == "basic_arithmetic" and row.answer == row.views().answer
    assert row.verifier.type == "reasoning_gym" and row.verifier.entry["question"] == row.prompt
    json.dumps(row.verifier.entry)  # JSON-safe


def test_reasoning_gym_worked_solution_becomes_a_view() -> None:
    row = load_rows("reasoning_gym:gsm_symbolic?train=1&eval=0")[0]
    assert row.views().solution and row.views().answer == row.answer


@pytest.mark.parametrize("task", ["leg_counting", "arc_agi"])  # arc_agi scores against tuples in its metadata
def test_reasoning_gym_scoring_survives_a_json_round_trip(tmp_path: Path, task: str) -> None:
    rows = load_rows(f"reasoning_gym:{task}?train=2&eval=1")
    path = tmp_path / "rg.jsonl"
    path.write_text("\n".join(row.model_dump_json() for row in rows))
    reloaded = load_rows(str(path))
    assert reloaded == rows
    for row in reloaded:
        assert verify(row.verifier, f"<answer>{row.answer}</answer>", row).passed
        assert not verify(row.verifier, "<answer>definitely wrong</answer>", row).passed
