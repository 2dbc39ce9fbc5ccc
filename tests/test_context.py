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
