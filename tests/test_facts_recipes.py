"""The knowledge-injection recipes (configs/facts/) name their method and run end to end through
a real offline flow on the tiny model (method sections kept, sizes shrunk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_offline_recipe, shrunk_recipe

FACTS = Path(__file__).resolve().parent.parent / "configs" / "facts"
RECIPES = ["opsd", "lora", "sft", "mixsd"]


def test_every_facts_recipe_is_here():
    assert {p.stem for p in FACTS.glob("*.yaml")} == set(RECIPES)
    assert "arXiv" in (FACTS / "mixsd.yaml").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", RECIPES)
def test_facts_recipe_runs_end_to_end(name, tiny_model_dir, tmp_path):
    raw = shrunk_recipe(FACTS / f"{name}.yaml", tiny_model_dir)
    raw["data"].update(train_limit=8, eval_limit=4)
    raw["train"]["steps"] = 2
    raw["eval"]["benchmarks"] = [{**b, "limit": 4} for b in raw["eval"]["benchmarks"]]
    metrics, cat, stages = run_offline_recipe(raw, name, tmp_path / "home")
    rollout = cat.artifact(stages["rollout"]["key"])["manifest"]
    if name == "mixsd":  # about half of the reply tokens drawn from the teacher's conditional
        assert 0.2 < rollout["guided_tokens"] / rollout["response_tokens"] < 0.8, rollout
