"""Every online recipe (configs/online/) validates, names its paper, and runs end to end through a
real online flow on the tiny model (its method sections kept, sizes shrunk)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from opsd.config import config_from_dict, load_config
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from tests.helpers import shrunk_recipe

ONLINE = Path(__file__).resolve().parent.parent / "configs" / "online"
RECIPES = ["opsd", "sdpo", "skill-sd", "atesd", "avsd", "kepo", "sd-zero", "brts", "cepo"]
DEMOS = [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 2


def _data(path: Path, pattern: str = r"^\s*\w", description: str = "start with a word") -> Path:
    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}?", "task": "sure",
                "privileged_context": {"demonstrations": DEMOS,
                                       "solution": f"Reply with Sure thing! then the number {i}."},
                "verifier": {"type": "regex", "pattern": pattern, "description": description},
                "split": "train" if i < 6 else "eval"}) + "\n")
    return path


def test_every_online_recipe_is_here_and_names_its_paper():
    assert {p.stem for p in ONLINE.glob("*.yaml")} == set(RECIPES)
    for name in RECIPES:
        cfg = load_config(ONLINE / f"{name}.yaml")
        assert cfg.mode == "online" and cfg.retention.enabled
        assert "arXiv" in (ONLINE / f"{name}.yaml").read_text() or name == "avsd"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", RECIPES)
def test_online_recipe_runs_end_to_end(name, tiny_model_dir, tmp_path):
    from opsd.flows.online import online_flow

    raw = shrunk_recipe(ONLINE / f"{name}.yaml", tiny_model_dir)
    # kepo: a verifier the tiny model's replies fail about half the time, so some prompts have
    # no passing reply and the hinted rescue runs
    # sd-zero: the same, so some attempts fail (the ones it revises) and some revisions pass
    data = (_data(tmp_path / "d.jsonl", r"^\s*[a-m]", "start with a to m")
            if name in ("kepo", "sd-zero", "brts", "cepo") else _data(tmp_path / "d.jsonl"))
    raw.update(data={"source": str(data)},
               online={"iterations": 2, "prompts_per_iteration": 3, "steps_per_iteration": 1,
                       "eval_every": 0})
    raw["rollout"]["n"] = 2
    if "reviser" in raw["train"]:
        raw["train"]["reviser"]["n"] = 2
    if "summarise" in raw:
        raw["summarise"]["max_new_tokens"] = 8
    if raw["teacher"]["context"].get("exposure", {}).get("mode") == "atesd":
        raw["teacher"]["context"]["exposure"]["hold"] = 1
    cfg = config_from_dict(raw, name)  # the validation a recipe file gets
    metrics = online_flow(config=cfg.model_dump(mode="json"), root=str(tmp_path / "home"),
                          show_progress=False)
    assert np.isfinite(metrics["eval.after.greedy"])
    cat = Catalog(Layout.at(tmp_path / "home"))
    run = cat.runs()[-1]
    assert run["status"] == "completed"
    labels = [s["label"] for s in cat.stages(run["run_id"])]
    assert {"teacher/000", "train/001", "checkpoint", "evaluate/after"} <= set(labels)
    teacher = cat.artifact(next(s["key"] for s in cat.stages(run["run_id"])
                                if s["label"] == "teacher/001"))["manifest"]
    if name == "atesd":  # the controller's sampled ratio, not the config's
        assert 0.0 < teacher["exposure"] < 1.0 and teacher["exposure"] != 0.5
    if name == "avsd":
        assert teacher["consensus"] == "gated_residual"
    if name == "kepo":  # the hinted rescue ran: what it says it rescued is what the data holds
        from opsd.storage.parquet import read_table

        art = cat.artifact(next(s["key"] for s in cat.stages(run["run_id"])
                                if s["label"] == "rollout/000"))
        t = read_table(Path(art["path"])).to_pylist()
        rescued = [r for r in t if r["sample_idx"] == raw["rollout"]["n"] - 1 and r["n_tokens"]
                   and r["guided_positions"] == list(range(r["n_tokens"]))]
        assert art["manifest"]["rescued_this_attempt"] == len(rescued)
        assert all(r["passed"] for r in rescued)
    if name == "sd-zero":
        _check_sd_zero(cat, run["run_id"], raw, tiny_model_dir)
    if name == "brts":
        _check_brts(cat, run["run_id"], raw)
    if name == "cepo":
        _check_cepo(cat, run["run_id"])


def _check_brts(cat, run_id, raw):
    """(brts: the verifier passes about half the tiny model's replies.) Every prompt has a
    selection record; a kept tier-1/2 reply is one the verifier passed, stored as one more sample
    of its prompt with the teacher's policy; the manifest counts what the records hold; the
    teacher stage scored the kept replies; training gave them weight teacher_reply."""
    from opsd.stages.rollout import read_selection
    from opsd.storage.parquet import read_table

    stages = {s["label"]: s["key"] for s in cat.stages(run_id)}
    n = raw["rollout"]["n"]
    recovered = 0
    for it in range(2):
        art = cat.artifact(stages[f"rollout/{it:03d}"])
        rows = {r["sample_id"]: r for r in read_table(Path(art["path"])).to_pylist()}
        records = read_selection(Path(art["path"]))
        assert len(records) == raw["online"]["prompts_per_iteration"]
        for rec in records:
            cands = rec["candidates"]
            assert sum(c["tier"] == 1 for c in cands) == raw["rollout"]["brts"]["n"]
            # the recovery step (the rows carry a solution) ran exactly when no tier-1 reply passed
            failed = not any(c["passed"] for c in cands if c["tier"] == 1)
            assert sum(c["tier"] == 2 for c in cands) == (
                raw["rollout"]["brts"]["recovery_tries"] if failed else 0)
            recovered += failed
            if rec["sample_id"] is None:
                continue
            kept, chosen = rows[rec["sample_id"]], cands[rec["chosen"]]
            assert kept["sample_idx"] == n and kept["text"] == chosen["text"]
            if rec["tier"] in (1, 2):  # correct first: a kept verified reply passes
                assert chosen["passed"] and kept["passed"]
                best = max(c["student_logp"] for c in cands if c["passed"] and c["tier"] == rec["tier"])
                assert chosen["student_logp"] == best  # then the most student-likely
            else:
                assert not any(c["passed"] for c in cands)
        man = art["manifest"]["brts"]
        assert man["kept"] == sum(r["sample_id"] is not None for r in records)
        assert man["tier1"] == sum(r["tier"] == 1 for r in records)
        assert art["manifest"]["samples"] == n * len(records)  # the student's own numbers
        targets = read_table(Path(cat.artifact(stages[f"teacher/{it:03d}"])["path"])).to_pylist()
        assert {r["sample_id"] for r in records if r["sample_id"]} <= {t["sample_id"] for t in targets}
    tiers = [cat.artifact(stages[f"rollout/{it:03d}"])["manifest"]["brts"] for it in range(2)]
    assert sum(t["tier1"] + t["tier2"] for t in tiers), "no verified teacher reply was ever kept"
    assert recovered, "no prompt needed the recovery step: it was never exercised"


def _check_cepo(cat, run_id):
    """(cepo: the verifier passes about half the tiny model's replies.) The teacher artifact holds
    the wrong-answer pass: a sample with a rejected sibling has a nonzero contrast that is the
    first pass's log-probs minus its own; one without has contrast 0; training used the credit."""
    from opsd.storage.parquet import NEGATIVE_FILE, read_table

    stages = {s["label"]: s["key"] for s in cat.stages(run_id)}
    nonzero = 0
    for it in range(2):
        roll = {r["sample_id"]: r for r in read_table(
            Path(cat.artifact(stages[f"rollout/{it:03d}"])["path"])).to_pylist()}
        art = cat.artifact(stages[f"teacher/{it:03d}"])
        pos = {r["sample_id"]: r["sampled_logprobs"] for r in read_table(Path(art["path"])).to_pylist()}
        neg = read_table(Path(art["path"]) / NEGATIVE_FILE).to_pylist()
        assert {r["sample_id"] for r in neg} == set(roll)
        for r in neg:
            np.testing.assert_allclose(r["contrast"], np.subtract(pos[r["sample_id"]],
                                                                  r["negative_logprobs"]), atol=1e-5)
            if r["rejected_from"] is None:
                assert not any(r["contrast"])
                continue
            sib = roll[r["rejected_from"]]
            assert sib["passed"] is False and sib["row_id"] == roll[r["sample_id"]]["row_id"]
            assert r["rejected_from"] != r["sample_id"]
            nonzero += bool(r["contrast"]) and any(abs(c) > 1e-4 for c in r["contrast"])
        assert art["manifest"]["negative"]["view"] == "solution"
    assert nonzero, "no sample had a rejected sibling: the contrast was never exercised"


def _check_sd_zero(cat, run_id, raw, model_dir):
    """Every iteration revised its failed attempts with the attempt in the reviser's context;
    the verdicts are the verifier's; a step with passing revisions trained the reviser on them."""
    import re

    from transformers import AutoTokenizer

    from opsd.storage.parquet import read_table

    tok = AutoTokenizer.from_pretrained(model_dir)
    stages = {s["label"]: s["key"] for s in cat.stages(run_id)}
    passing = 0
    for it in range(2):
        roll = {r["sample_id"]: r for r in read_table(
            Path(cat.artifact(stages[f"rollout/{it:03d}"])["path"])).to_pylist()}
        rev_art = cat.artifact(stages[f"revise/{it:03d}"])
        revs = read_table(Path(rev_art["path"])).to_pylist()
        failed = [sid for sid, r in roll.items() if r["passed"] is False]
        # revise: failed — n revisions of each failed attempt, none of a passing one
        assert sorted(r["attempt_id"] for r in revs) == sorted(failed * raw["train"]["reviser"]["n"])
        for r in revs:
            attempt = roll[r["attempt_id"]]
            prompt = tok.decode(r["prompt_ids"])
            assert "judged incorrect (reward 0)" in prompt and attempt["text"] in prompt
            assert r["passed"] == bool(re.match(r"^\s*[a-m]", r["text"]))
            assert r["iteration"] == it and r["attempt_passed"] is False
        m = rev_art["manifest"]
        assert m["revisions"] == len(revs) and m["passing"] == sum(r["passed"] for r in revs)
        train = cat.artifact(stages[f"train/{it:03d}"])
        assert train["manifest"]["inputs"]["revisions"] == rev_art["key"]
        hist = read_table(Path(train["path"]) / "metrics.parquet").to_pylist()
        good = [r["n_tokens"] for r in revs if r["passed"] and r["n_tokens"]]
        if good:  # one step per iteration, drawing up to batch_size (4) passing revisions
            passing += 1
            assert hist[0]["reviser_tokens"] == train["manifest"]["reviser_tokens"] > 0
            assert hist[0]["reviser_tokens"] <= sum(good)
            if len(good) <= raw["train"]["batch_size"]:
                assert hist[0]["reviser_tokens"] == sum(good)
            assert hist[0]["reviser_loss"] > 0 and train["manifest"]["reviser_loss"] > 0
        else:
            assert hist[0]["reviser_tokens"] == 0 and hist[0]["reviser_loss"] is None
    assert passing, "no iteration had a passing revision: the reviser term was never exercised"
