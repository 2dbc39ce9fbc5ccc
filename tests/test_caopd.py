"""CaOPD's confidence revision (Zhang et al. 2026, arXiv:2604.16830): a reply's stated confidence
is replaced by its prompt's empirical pass rate before the teacher scores it and the student trains
on it. Hand-computed cases of the rule, its token form, the teacher's note, and the recipe end to
end through a real offline flow on the tiny model."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opsd.calibration import format_confidence, pass_rates, revise_ids, revise_text
from opsd.config import ConfigError, ContextConfig, config_from_dict, load_config
from opsd.context.builders import dynamic_views
from opsd.context.render import build_context
from opsd.data.rows import Row
from opsd.metrics import stated_confidence
from opsd.models import load_tokenizer
from opsd.storage.parquet import CONTEXTS_FILE, read_table
from tests.helpers import DEMOS, run_offline_recipe, shrunk_recipe

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "caopd.yaml"


def _data(path: Path) -> Path:
    """Rows whose verifier a random model's replies pass about half the time (rates vary)."""
    with path.open("w") as f:
        for i in range(10):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}?", "task": "t",
                "privileged_context": {"demonstrations": DEMOS},
                "verifier": {"type": "regex", "pattern": r"^\s*[a-m]"},
                "split": "train" if i < 6 else "eval"}) + "\n")
    return path


def test_pass_rate_is_the_share_of_a_prompts_rollouts_that_passed():
    rows = ["a", "a", "a", "a", "b", "b", "b", "c", "c", "d", "d", "d"]
    passed = [True, False, True, False, True, True, True, None, None, False, None, True]
    # a: 2 of 4; b: 3 of 3; c: no verdict at all (no rate); d: 1 of the 2 with a verdict
    assert pass_rates(rows, passed) == {"a": 0.5, "b": 1.0, "d": 0.5}
    assert format_confidence(1 / 3) == "0.33"
    assert format_confidence(2 / 3, 1) == "0.7"
    assert format_confidence(1.0) == "1.00" and format_confidence(0.0, 0) == "0"


@pytest.mark.parametrize("text, confidence, want", [
    # a stated confidence is replaced (the statement moves to the end, on its own line)
    ("The answer is 4. Confidence: 0.95", "0.50", "The answer is 4.\nConfidence: 0.50"),
    # percent and lower case, mid-reply: stripped where it stood
    ("Answer: B\nconfidence: 80%\nThanks!", "0.75", "Answer: B\n\nThanks!\nConfidence: 0.75"),
    # every statement goes, not only the last
    ("Confidence: 0.9. I think 7; my confidence is 70%", "0.25",
     ". I think 7; my\nConfidence: 0.25"),
    # a reply stating none is given one
    ("Sure thing! Paris.", "0.33", "Sure thing! Paris.\nConfidence: 0.33"),
    ("Sure thing! Paris.  \n", "1.00", "Sure thing! Paris.\nConfidence: 1.00"),
    ("", "0.00", "Confidence: 0.00"),
])
def test_revised_text_states_the_pass_rate_and_nothing_else(text, confidence, want):
    got = revise_text(text, confidence)
    assert got == want
    assert stated_confidence(got) == float(confidence)  # what evaluation will parse from it


def test_revised_ids_keep_the_sampled_prefix_and_end_token(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    eos = tok.eos_token_id
    # a finished reply stating a confidence: the prefix before the statement is kept verbatim
    prefix = tok.encode("The answer is 4.", add_special_tokens=False)
    ids = tok.encode("The answer is 4. Confidence: 0.95", add_special_tokens=False) + [eos]
    assert ids[:len(prefix)] == prefix  # (the tokenizer splits there: the test's premise)
    text = tok.decode(ids, skip_special_tokens=True)
    new, k = revise_ids(ids, text, tok, "0.50")
    assert k == len(prefix) and new[:k] == prefix and new[-1] == eos
    assert tok.decode(new, skip_special_tokens=True) == "The answer is 4.\nConfidence: 0.50"
    assert new[k:-1] == tok.encode("\nConfidence: 0.50", add_special_tokens=False)
    # a truncated reply stating none: every sampled token kept, the statement appended, no end
    ids = tok.encode("Sure thing! The capital", add_special_tokens=False)
    new, k = revise_ids(ids, tok.decode(ids), tok, "0.25")
    assert k == len(ids) and new == ids + tok.encode("\nConfidence: 0.25", add_special_tokens=False)
    # an empty reply that stopped at once
    new, k = revise_ids([eos], "", tok, "1.00")
    assert k == 0 and new == tok.encode("Confidence: 1.00", add_special_tokens=False) + [eos]


def test_the_teacher_sees_the_pass_rate_as_a_note_and_in_its_demonstrations():
    row = Row.model_validate({
        "id": "q", "prompt": "2+2?", "privileged_context": {"demonstrations": [
            {"prompt": "1+1?", "completion": "2. Confidence: 1.00"},
            {"prompt": "3+3?", "completion": "6"}]}})
    rollouts = {"sample_id": ["q#0", "q#1", "q#2", "q#3"], "row_id": ["q"] * 4,
                "task": [""] * 4, "text": ["4", "5", "4", "4"], "passed": [True, False, True, True],
                "reward": [1.0, 0.0, 1.0, 1.0], "feedback": [None] * 4}
    cfg = ContextConfig(views=["demonstrations", "confidence"])
    extra = dynamic_views(rollouts, cfg)
    assert {sid: v["confidence"] for sid, v in extra.items()} == {f"q#{i}": "0.75" for i in range(4)}
    ctx = build_context(row, cfg, extra["q#0"])
    assert ctx.system == ["The empirical confidence for this question is 0.75. "
                          "Output this exact value."]
    assert [t["content"] for t in ctx.turns] == ["1+1?", "2.\nConfidence: 0.75", "3+3?", "6"]
    assert build_context(row, cfg).turns[1]["content"] == "2. Confidence: 1.00"  # no rate: as is
    # the template enters a teacher key only when the view is shown
    assert "confidence_template" in cfg.key_dict()
    assert "confidence_template" not in ContextConfig().key_dict()


def test_the_recipe_validates_names_its_paper_and_is_offline_only():
    cfg = load_config(RECIPE)
    assert "arXiv:2604.16830" in RECIPE.read_text()
    assert cfg.confidence.revise and "confidence" in cfg.teacher.context.views
    assert cfg.retention.enabled
    raw = cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match="online"):
        config_from_dict({**raw, "mode": "online"}, "recipe")
    with pytest.raises(ConfigError, match="confidence"):
        config_from_dict({**raw, "confidence": {"revise": True, "template": "C="}}, "recipe")


@pytest.mark.timeout(300)
def test_the_caopd_recipe_revises_what_teacher_and_student_see(tiny_model_dir, tmp_path):
    raw = shrunk_recipe(RECIPE, tiny_model_dir)
    raw["data"] = {"source": str(_data(tmp_path / "d.jsonl"))}
    raw["rollout"]["n"] = 3
    raw["teacher"]["dtype"] = "float32"
    raw["train"]["steps"] = 2
    metrics, cat, stages = run_offline_recipe(raw, "caopd", tmp_path / "home")
    before = read_table(Path(cat.artifact(stages["rollout"]["key"])["path"])).to_pydict()
    art = cat.artifact(stages["confidence"]["key"])
    after = read_table(Path(art["path"])).to_pydict()
    assert after["sample_id"] == before["sample_id"] and after["passed"] == before["passed"]
    # the pass rates, counted here by hand from the original rollouts' verdicts
    verdicts = defaultdict(list)
    for rid, ok in zip(before["row_id"], before["passed"]):
        verdicts[rid].append(ok)
    rate = {rid: sum(v) / len(v) for rid, v in verdicts.items()}
    assert art["manifest"]["revised"] == len(after["sample_id"])
    assert len(set(rate.values())) > 1  # the verifier splits the replies: the rates differ
    tok = load_tokenizer(tiny_model_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for i, sid in enumerate(after["sample_id"]):
        want = f"Confidence: {rate[after['row_id'][i]]:.2f}"
        assert after["text"][i].endswith(want), (after["text"][i], want)
        assert stated_confidence(after["text"][i]) == round(rate[after["row_id"][i]], 2)
        old, new = list(before["response_ids"][i]), list(after["response_ids"][i])
        k = 0
        while k < min(len(old), len(new)) and old[k] == new[k]:
            k += 1
        assert tok.decode(new, skip_special_tokens=True) == after["text"][i]
        if stated_confidence(before["text"][i]) is None:  # nothing to strip: no sampled token lost
            assert k >= len([t for t in old if t not in tok.all_special_ids])
        assert after["n_tokens"][i] == len(new)
        # behaviour log-probs: sampled ones on the kept prefix, the student's own on the rest
        with torch.no_grad():
            prompt = list(before["prompt_ids"][i])
            lp = student(torch.tensor([prompt + new])).logits[0].float().log_softmax(-1)
        want_new = lp[len(prompt) - 1 + k: len(prompt) - 1 + len(new)].gather(
            -1, torch.tensor(new[k:])[:, None]).squeeze(-1)
        got = torch.tensor(after["behaviour_logprobs"][i])
        assert len(got) == len(new)
        torch.testing.assert_close(got[:k], torch.tensor(before["behaviour_logprobs"][i][:k]))
        torch.testing.assert_close(got[k:], want_new, atol=2e-4, rtol=0)
    # the teacher scored the revised replies with the note in its context, and training read them
    teacher = cat.artifact(stages["teacher"]["key"])
    assert teacher["manifest"]["inputs"]["rollouts"] == art["key"]
    assert stages["train"]["key"]
    contexts = read_table(Path(teacher["path"]) / CONTEXTS_FILE).to_pydict()["context_ids"]
    notes = [tok.decode(c) for c in contexts]
    assert all("The empirical confidence for this question is" in n for n in notes)
    assert {f"is {r:.2f}." for r in rate.values()} == {
        n.split("for this question ")[1].split(" Output")[0] for n in notes}
