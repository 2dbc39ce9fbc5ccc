"""Retention: the base model's own greedy replies to rule-free prompts as the reference."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from opsd.config import RetentionConfig
from opsd.pool import ModelPool, Policy, base_policy
from opsd.stages import retention as retention_stage
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import read_table


def _ctx(path: Path, pool: ModelPool) -> StageContext:
    path.mkdir(parents=True, exist_ok=True)
    return StageContext(out_dir=path, pool=pool, show_progress=False)


def test_builtin_prompts_are_neutral_and_distinct():
    from opsd.data.suites.behaviours import RULES

    assert len(retention_stage.GENERAL_PROMPTS) == 32
    assert len(set(retention_stage.GENERAL_PROMPTS)) == 32
    taught = {q for rule in RULES.values() for q, _ in rule.items}
    assert not taught & set(retention_stage.GENERAL_PROMPTS)


def test_base_model_retains_itself_and_a_changed_model_does_not(tiny_model_dir, tmp_path):
    pool = ModelPool()
    base = base_policy(Path(tiny_model_dir))
    cfg = RetentionConfig(enabled=True, prompts=6, max_new_tokens=8, panel_max_new_tokens=8,
                          panel=["reasoning_gym:leg_counting?train=0&eval=4",
                                 "reasoning_gym:syllogism?train=0&eval=3"])
    man_b = retention_stage.base_run(cfg, base, _ctx(tmp_path / "base", pool))
    base_art = Artifact("b", tmp_path / "base", man_b)
    same = retention_stage.run(cfg, base_art, base, _ctx(tmp_path / "same", pool))
    assert same["exact_match"] == 1.0 and same["prefix_match"] == 1.0
    assert same["exact_match_untaught"] == 1.0 and same["rule_leak"] == 0.0
    assert same["logprob"] == pytest.approx(man_b["base_logprob"], abs=1e-6)
    assert same["logprob_delta"] == pytest.approx(0.0, abs=1e-6)
    assert same["logprob_delta_untaught"] == pytest.approx(0.0, abs=1e-6)
    # the panel (7 reasoning-gym rows) and the reference text: unchanged for the base itself
    assert same["panel_delta"] == 0.0 and set(same["panel_tasks"]) == {"leg_counting", "syllogism"}
    assert same["panel_questions_delta"] == 0.0 and same["panel_questions_n"] == 7
    assert same["text_logprob_delta"] == pytest.approx(0.0, abs=1e-6)
    assert man_b["text_base_logprob"] < 0

    # a panel whose rows changed under the same key (a suite edited with the code version
    # pinned) is refused, not compared with the base's answers to other questions
    grown = cfg.model_copy(update={"panel": ["reasoning_gym:leg_counting?train=0&eval=5",
                                             "reasoning_gym:syllogism?train=0&eval=3"]})
    with pytest.raises(retention_stage.PanelMismatch, match="cover 7 questions, the panel asks 8"):
        retention_stage.run(grown, base_art, base, _ctx(tmp_path / "grown", pool))

    # a perturbed copy: its greedy replies drift and it finds the base replies less likely
    changed = copy.deepcopy(pool.master(base))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other = Policy("model-perturbed", base.path, "perturbed")
    pool.adopt(other, changed)
    moved = retention_stage.run(cfg, base_art, other, _ctx(tmp_path / "moved", pool))
    assert abs(moved["logprob_delta"]) > 1e-3
    assert moved["exact_match"] < 1.0
    assert abs(moved["text_logprob_delta"]) > 1e-3
    # the headline panel figure counts questions: recomputed from the stored replies
    after_t = read_table(tmp_path / "moved" / retention_stage.PANEL_DIR).to_pydict()
    greedy = [p for p, g in zip(after_t["passed"], after_t["greedy"]) if g]
    assert moved["panel_questions"] == pytest.approx(sum(greedy) / len(greedy))
    assert moved["panel_questions_delta"] == pytest.approx(
        moved["panel_questions"] - moved["panel_questions_base"])
    # brute force: one full forward per reply, log-softmax over the whole sequence
    t = read_table(tmp_path / "base" / retention_stage.REPLIES_FILE).to_pydict()
    total, n = 0.0, 0
    with torch.no_grad():
        for p_ids, r_ids in zip(t["prompt_ids"], t["response_ids"]):
            ids = torch.tensor([list(p_ids) + list(r_ids)])
            logp = changed(input_ids=ids).logits[0].log_softmax(-1)
            pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(r_ids))
            total += float(logp[pos, torch.tensor(r_ids)].sum())
            n += len(r_ids)
    assert moved["logprob"] == pytest.approx(total / n, abs=1e-4)
    per = json.loads((tmp_path / "moved" / "per_prompt.json").read_text())
    assert len(per) == 6 and {"prompt", "exact", "logprob", "base_logprob", "reply"} <= set(per[0])
    head = retention_stage.headline(Artifact("m", tmp_path / "moved", moved))
    assert set(head) == {f"retention.{k}" for k in retention_stage.METRICS} | {
        "retention.panel_delta.leg_counting", "retention.panel_delta.syllogism"}


def test_offline_flow_with_retention_and_a_live_teacher(tiny_model_dir, tmp_path):
    """The offline flow wires retention after evaluate/after and passes the teacher to a
    live-teacher objective; a rerun reuses everything, retention's base replies included."""
    from opsd.flows.offline import offline_flow
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout
    from tests.helpers import tiny_config, write_dataset

    data = write_dataset(tmp_path / "data.jsonl")
    cfg = tiny_config(tiny_model_dir, data)
    cfg["train"] = {**cfg["train"], "objective": "jsd", "divergence": {"jsd_beta": 0.5}, "epochs": 1}
    cfg["retention"] = {"enabled": True, "prompts": 4, "max_new_tokens": 6,
                        "panel": ["reasoning_gym:leg_counting?train=0&eval=3"],
                        "panel_max_new_tokens": 6}
    # a benchmark panel: another file, scored before and after (and by the teacher)
    other = write_dataset(tmp_path / "other.jsonl", n_train=0, n_eval=3)
    cfg["eval"] = {"max_new_tokens": 6,
                   "benchmarks": [{"source": str(other), "teacher": True},
                                  "reasoning_gym:leg_counting?train=0&eval=2"]}
    root = tmp_path / "home"
    m = offline_flow(config=cfg, root=str(root), show_progress=False)
    for k in ("retention.logprob_delta", "retention.exact_match", "retention.logprob",
              "retention.base_logprob", "eval.after.greedy", "retention.panel_delta",
              "retention.text_logprob_delta", "retention.exact_match_untaught",
              "eval.before.other.greedy", "eval.after.other.greedy", "eval.teacher.other.greedy",
              "eval.after.leg_counting.greedy", "eval.delta.leg_counting.greedy",
              "train.steps", "train.loss_trend"):
        assert k in m, k
    assert "eval.teacher.leg_counting.greedy" not in m  # teacher: only where asked for
    layout = Layout.at(root)
    cat = Catalog(layout)
    run = cat.runs()[-1]
    labels = [s["label"] for s in cat.stages(run["run_id"])]
    assert labels[-5:] == ["evaluate/after", "evaluate/after/other", "evaluate/after/leg_counting",
                           "retention/base", "retention"]
    assert {"evaluate/before/other", "evaluate/teacher/other"} <= set(labels)
    assert (layout.run_dir(run["run_id"]) / "compliance.txt").read_text().count("leg_counting") == 1
    assert "retention.exact_match" in run["metrics"]
    _, rows = cat.query("SELECT manifest_json FROM artifacts WHERE stage = 'train'")
    man = json.loads(rows[0][0]) if isinstance(rows[0][0], str) else rows[0][0]
    assert man["live_teacher"] is True and man["objective"] == "jsd"
    m2 = offline_flow(config=cfg, root=str(root), show_progress=False)
    assert m2["stages_run"] == 0
    assert m2["retention.exact_match"] == m["retention.exact_match"]


def test_online_flow_scores_benchmarks_and_retention(tiny_model_dir, tmp_path):
    """The online flow evaluates the benchmark panel before and after and runs retention on the
    final checkpoint, like the offline flow."""
    from opsd.flows.online import online_flow
    from tests.helpers import online_config, write_dataset

    data = write_dataset(tmp_path / "data.jsonl")
    cfg = online_config(tiny_model_dir, data, iterations=1, tracking={"log_model": False},
                        retention={"enabled": True, "prompts": 3, "max_new_tokens": 4,
                                   "panel": ["reasoning_gym:leg_counting?train=0&eval=2"],
                                   "panel_max_new_tokens": 4},
                        eval={"max_new_tokens": 6,
                              "benchmarks": ["reasoning_gym:leg_counting?train=0&eval=2"]})
    m = online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    for k in ("eval.before.leg_counting.greedy", "eval.after.leg_counting.greedy",
              "eval.delta.leg_counting.greedy", "retention.panel_delta",
              "retention.text_logprob_delta", "online.iterations"):
        assert k in m, k


def test_panel_headline_weighs_questions_not_tasks():
    """200 general questions at 50 % beside two 16-question tasks at 0 %: the macro over tasks
    reads 16.7 %, the questions' rate 100 / 232; a task of one question cannot outweigh 200."""
    passed = [True] * 100 + [False] * 100 + [False] * 32
    table = {"passed": passed + [True] * 5, "greedy": [True] * 232 + [False] * 5}
    rate, n = retention_stage.question_rate(table)
    assert n == 232 and rate == pytest.approx(100 / 232)
    assert retention_stage.question_rate({"passed": [], "greedy": []}) == (0.0, 0)
