"""MOPD (Ma et al. 2026, arXiv:2606.30406): several named teachers, each row scored by the one its
route picks. Checked against an independent forward of the routed teacher, through a real offline
flow on two different tiny random teachers, and the recipe end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opsd.config import ConfigError, ContextConfig, PipelineConfig, config_from_dict, load_config
from opsd.data.rows import Row
from opsd.routing import route
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from opsd.storage.parquet import read_table
from tests.helpers import run_offline_recipe, shrunk_recipe, tiny_config, write_dataset

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "mopd.yaml"


def _random_teacher(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """Another random model with the tiny model's tokenizer (a 'domain teacher' of other weights)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def teachers(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return {name: _random_teacher(tiny_model_dir, tmp_path_factory.mktemp(name), seed)
            for name, seed in (("sure", 1), ("plain", 2))}


def _row(task=None, **meta) -> Row:
    return Row.model_validate({"id": "r", "prompt": "Hi?", "task": task, "metadata": meta})


def test_the_route_table_picks_a_teacher_per_row_field_and_the_default_for_the_rest():
    table = {"math": "m", "code": "c"}
    assert route(_row("math"), "task", table, "d") == "m"
    assert route(_row("code"), "task", table, "d") == "c"
    assert route(_row("chat"), "task", table, "d") == "d"  # not in the table
    assert route(_row(None), "task", table, "d") == "d"  # no task at all
    assert route(_row("chat", data_source="math"), "data_source", table, "d") == "m"
    assert route(_row("math"), "data_source", table, "d") == "d"  # no data_source


def _mopd(tiny_model_dir, data, teachers, **route):
    cfg = tiny_config(tiny_model_dir, data)
    cfg["teacher"].update(dtype="float32", teachers=[
        {"name": "sure", "model": {"name": str(teachers["sure"])}, "views": ["demonstrations"]},
        {"name": "plain", "model": {"name": str(teachers["plain"])}, "views": []},
        {"name": "self"},  # the student's own weights with teacher.context's views: never routed
    ], route={"by": "task", "map": {"sure": "sure"}, "default": "plain", **route})
    cfg["train"].update(objective="reverse_kl_sampled")
    return cfg


def test_teacher_config_refuses_what_routing_cannot_do(tiny_model_dir, teachers, tmp_path):
    base = _mopd(tiny_model_dir, tmp_path / "d.jsonl", teachers)
    assert PipelineConfig.model_validate(base).teacher.default_teacher() == "plain"
    no_default = {**base, "teacher": {**base["teacher"], "route": {"map": {"sure": "sure"}}}}
    assert PipelineConfig.model_validate(no_default).teacher.default_teacher() == "sure"  # first
    bad = [
        ({"route": {"map": {"sure": "nobody"}}}, "unknown teacher"),
        ({"route": {"default": "nobody"}}, "unknown teacher"),
        ({"teachers": base["teacher"]["teachers"] + [{"name": "sure"}]}, "duplicate"),
        ({"teachers": [{"name": "x", "views": ["nonsense"]}]}, "unknown view"),
        ({"model": {"name": str(tiny_model_dir)}, "kind": "external"}, "replaces teacher.model"),
        ({"context": {"consensus": "mean_prob", "consensus_views": [["system"], ["answer"]]}},
         "consensus"),
        ({"negative_view": "solution"}, "negative_view"),
    ]
    for teacher, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "teacher": {**base["teacher"], **teacher}}, "recipe")
    with pytest.raises(ConfigError, match="route needs teacher.teachers"):
        config_from_dict({**base, "teacher": {"route": {"map": {"a": "b"}}}}, "recipe")
    for other in ({"mode": "online"}, {"train": {**base["train"], "objective": "jsd"}}):
        with pytest.raises(ConfigError, match="MOPD"):
            config_from_dict({**base, **other}, "recipe")
    # without named teachers the key of a recipe is what it was before the fields existed
    plain = PipelineConfig.model_validate(tiny_config(tiny_model_dir, tmp_path / "d.jsonl"))
    assert "teachers" not in plain.teacher.key_dict() and "route" not in plain.teacher.key_dict()


def _logprobs(model, prompt: list[int], resp: list[int]) -> torch.Tensor:
    """Brute force: one plain forward of ``model`` on prompt + reply, [reply, V] log-probs."""
    with torch.no_grad():
        lp = model(torch.tensor([prompt + resp])).logits[0].float().log_softmax(-1)
    return lp[len(prompt) - 1: len(prompt) - 1 + len(resp)]


@pytest.mark.timeout(300)
def test_each_row_is_scored_by_the_teacher_it_was_routed_to(tiny_model_dir, teachers, tmp_path):
    from opsd.context.render import build_context, student_turn_ids, teacher_ids
    from opsd.flows.offline import offline_flow
    from opsd.models import load_tokenizer

    data = write_dataset(tmp_path / "data.jsonl")  # tasks alternate: "other", "sure", ...
    cfg = _mopd(tiny_model_dir, data, teachers)
    metrics = offline_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    assert np.isfinite(metrics["eval.after.greedy"])
    cat = Catalog(Layout.at(tmp_path / "home"))
    stages = {s["label"]: s for s in cat.stages(cat.runs()[-1]["run_id"])}
    art = cat.artifact(stages["teacher"]["key"])
    t = read_table(Path(art["path"])).to_pydict()
    roll = read_table(Path(cat.artifact(stages["rollout"]["key"])["path"])).to_pydict()
    task_of = {rid: task for rid, task in zip(roll["row_id"], roll["task"])}
    want_names = ["sure" if task_of[rid] == "sure" else "plain" for rid in t["row_id"]]
    assert t["teacher_name"] == want_names
    assert art["manifest"]["route_by"] == "task"
    routed = art["manifest"]["teachers"]
    assert {n: v["samples"] for n, v in routed.items()} == {
        "sure": want_names.count("sure"), "plain": want_names.count("plain"), "self": 0}
    assert want_names.count("sure") > 0 and want_names.count("plain") > 0
    assert routed["sure"]["key"] != routed["plain"]["key"]
    assert sorted(t["sample_id"]) == sorted(roll["sample_id"])

    rows = {r["id"]: r for r in map(json.loads, Path(data).read_text().splitlines())}
    tok = load_tokenizer(tiny_model_dir)
    models = {n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
              for n, p in teachers.items()}
    views = {"sure": ["demonstrations"], "plain": []}
    resp_of = dict(zip(roll["sample_id"], roll["response_ids"]))
    checked = {"sure": 0, "plain": 0}
    for j, sid in enumerate(t["sample_id"]):
        resp, name = list(resp_of[sid]), t["teacher_name"][j]
        if not resp:
            continue
        row = Row.model_validate(rows[t["row_id"][j]])
        ctx = build_context(row, ContextConfig(), views=views[name])
        prompt = teacher_ids(tok, row, ctx, student_turn_ids(tok, row))
        lp = _logprobs(models[name], prompt, resp)
        sampled = lp.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(t["sampled_logprobs"][j]), sampled, atol=2e-4, rtol=0)
        top = lp.topk(4, dim=-1)
        assert t["topk_ids"][j] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(t["topk_logprobs"][j]), top.values, atol=1e-2,
                                   rtol=0)  # stored as float16
        # the other teacher would have given other targets: the check tells the two apart
        other = "plain" if name == "sure" else "sure"
        other_lp = _logprobs(models[other], prompt, resp).gather(
            -1, torch.tensor(resp)[:, None]).squeeze(-1)
        assert (other_lp - sampled).abs().max() > 1e-2
        checked[name] += 1
    assert checked["sure"] > 0 and checked["plain"] > 0


def test_the_mopd_recipe_validates_and_names_its_paper():
    cfg = load_config(RECIPE)
    assert "arXiv:2606.30406" in RECIPE.read_text()
    assert len(cfg.teacher.teachers) >= 2 and cfg.teacher.route.map
    assert cfg.retention.enabled


@pytest.mark.timeout(300)
def test_the_mopd_recipe_runs_end_to_end(tiny_model_dir, tmp_path):
    raw = shrunk_recipe(RECIPE, tiny_model_dir)
    raw["data"].update(train_limit=8, eval_limit=4)
    raw["train"]["steps"] = 2
    metrics, cat, stages = run_offline_recipe(raw, "mopd", tmp_path / "home")
    teacher = cat.artifact(stages["teacher"]["key"])
    names = read_table(Path(teacher["path"]), columns=["teacher_name"]).column(0).to_pylist()
    counts = {n: v["samples"] for n, v in teacher["manifest"]["teachers"].items()}
    assert counts == {n: names.count(n) for n in counts} and sum(counts.values()) == len(names)
