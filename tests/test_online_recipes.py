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
RECIPES = ["opsd", "sdpo", "skill-sd", "atesd", "avsd", "kepo"]
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
    data = (_data(tmp_path / "d.jsonl", r"^\s*[a-m]", "start with a to m") if name == "kepo"
            else _data(tmp_path / "d.jsonl"))
    raw.update(data={"source": str(data)},
               online={"iterations": 2, "prompts_per_iteration": 3, "steps_per_iteration": 1,
                       "eval_every": 0})
    raw["rollout"]["n"] = 2
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
