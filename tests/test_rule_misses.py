"""bench/rule_misses.py: which literal rules it reads, and the span probability it reports,
against a token-by-token reference on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.rule_misses import (
    LiteralRule,
    limited_by,
    literal_rule,
    score_replies,
    span_ids,
    span_logprob,
    summary,
    without_span,
)
from opsd.config import ContextConfig
from opsd.data import load_rows


def test_literal_rules_of_the_behaviours_suite_and_what_is_refused():
    assert literal_rule(r"^\s*Sure thing!") == LiteralRule("start", "Sure thing!")
    assert literal_rule(r"^\s*Fun fact:") == LiteralRule("start", "Fun fact:")
    assert literal_rule(r"Hope this helps!\s*$") == LiteralRule("end", "Hope this helps!")
    assert literal_rule(r"Cost: \$5\.\s*$") == LiteralRule("end", "Cost: $5.")  # escaped metas
    for pattern in (r"^\s*(Sure|Yes)", r"\d+\s*$", r"Hope.*\s*$", r"answer", r"^\s*a\sb"):
        assert literal_rule(pattern) is None, pattern


def test_without_span_removes_the_rule_only_where_it_belongs():
    end, start = LiteralRule("end", "Hope this helps!"), LiteralRule("start", "Sure thing!")
    assert without_span("Roast it. Hope this helps! ", end) == "Roast it."
    assert without_span("Hope this helps! Roast it.", end) == "Hope this helps! Roast it."
    assert without_span("  Sure thing! Paris.", start) == "Paris."
    assert without_span("Paris. Sure thing!", start) == "Paris. Sure thing!"


def test_span_logprob_matches_token_by_token_forwards(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prefix = tok.encode("What is a good way to cook okra? Slice it and fry it.")
    before, span = span_ids(tok, "Slice it and fry it.", LiteralRule("end", "Hope this helps!"))
    assert tok.decode(span) == " Hope this helps!" and tok.decode(before) == "Slice it and fry it."
    # reference: one forward per span token, each on the growing prefix
    total, ids = 0.0, list(prefix)
    with torch.no_grad():
        for t in span:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            total += float(torch.log_softmax(logits, -1)[t])
            ids.append(t)
    assert span_logprob(model, prefix, span) == pytest.approx(total, abs=1e-4)
    assert span_ids(tok, "ignored", LiteralRule("start", "Sure thing!"))[0] == []


def test_score_replies_sorts_misses_by_the_teachers_probability(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [r for r in load_rows("behaviours?train=0&eval=2&eval_set=ood") if r.split == "eval"]
    replies = {rows[0].id: ("Paris is the capital.", False), rows[2].id: ("Roast it. Hope this helps!", True),
               rows[3].id: ("Roast it.", False)}
    cfg = ContextConfig(views=["demonstrations"])
    recs = score_replies(rows, replies, tok, model, model, cfg, threshold=0.5)
    assert [r["row_id"] for r in recs] == [rows[0].id, rows[2].id, rows[3].id]  # rows not replied to: none
    for r in recs:
        assert 0.0 < r["p_teacher"] <= 1.0 and 0.0 < r["p_student"] <= 1.0
        assert r["limited_by"] == (None if r["passed"] else
                                   "student" if r["p_teacher"] >= 0.5 else "teacher")
    # the passed reply is scored where its span stood: after "Roast it.", as if it had stopped there
    from opsd.context.render import student_ids

    before = tok.encode("Roast it.", add_special_tokens=False)
    span = tok.encode(" Hope this helps!", add_special_tokens=False)
    assert recs[1]["p_student"] == pytest.approx(
        math.exp(span_logprob(model, student_ids(tok, rows[2]) + before, span)), rel=1e-4)
    # every miss is student-limited at threshold 0 and teacher-limited above 1
    assert {r["limited_by"] for r in score_replies(rows, replies, tok, model, model, cfg, 0.0)
            if not r["passed"]} == {"student"}
    low = score_replies(rows, replies, tok, model, model, cfg, 1.01)
    hope, sure = summary(low)
    assert (hope["task"], hope["replies"], hope["missed"], hope["teacher_limited"]) == (
        "hope-helps", 2, 1, 1)
    assert hope["p_teacher_missed"] == pytest.approx(low[2]["p_teacher"])
    assert (sure["task"], sure["replies"], sure["missed"], sure["student_limited"]) == (
        "sure-thing", 1, 1, 0)


def test_a_reply_cut_at_the_cap_cannot_miss_an_end_rule_on_its_own(tiny_model_dir):
    end, start = LiteralRule("end", "Hope this helps!"), LiteralRule("start", "Sure thing!")
    assert limited_by(True, True, end, 0.0, 0.5) is None
    assert limited_by(False, True, end, 0.9, 0.5) == "cap"  # whatever either side's P
    assert limited_by(False, True, start, 0.9, 0.5) == "student"  # a start rule was reachable
    assert limited_by(False, False, end, 0.1, 0.5) == "teacher"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [r for r in load_rows("behaviours?train=0&eval=2&eval_set=ood") if r.split == "eval"]
    replies = {rows[0].id: ("Paris is", False, "length"), rows[2].id: ("Roast it and", False, "length"),
               rows[3].id: ("Roast it.", False, "stop")}
    recs = score_replies(rows, replies, tok, model, model, ContextConfig(views=["demonstrations"]), 1.01)
    assert [r["limited_by"] for r in recs] == ["teacher", "cap", "teacher"]
    assert [r["cut"] for r in recs] == [True, True, False]
    hope = next(s for s in summary(recs) if s["task"] == "hope-helps")
    assert (hope["missed"], hope["cap_limited"], hope["teacher_limited"]) == (2, 1, 1)
    assert hope["p_teacher_missed"] == pytest.approx(recs[2]["p_teacher"])  # the cut one left out
