"""Online mode on a tiny model: per-iteration artifacts, PI logging, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from tests.helpers import online_config, write_dataset


def _cat(root: Path) -> Catalog:
    layout = Layout.at(root)
    return Catalog(layout)


def _final_weights(root: Path) -> dict:
    _, rows = _cat(root).query("SELECT path FROM artifacts WHERE stage = 'checkpoint'")
    return load_file(str(Path(rows[-1][0]) / "model" / "model.safetensors"))


def test_online_flow_iterations_and_pi_logging(tiny_model_dir, tmp_path):
    from opsd.flows.online import online_flow

    data = write_dataset(tmp_path / "data.jsonl")
    cfg = online_config(tiny_model_dir, data, summarise={"enabled": True, "max_new_tokens": 8},
                        teacher={"topk": 4, "context": {"views": ["demonstrations", "feedback",
                                                                  "sibling", "skills"]}})
    online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    cat = _cat(tmp_path / "home")
    run = cat.runs()[-1]
    labels = [s["label"] for s in cat.stages(run["run_id"])]
    for i in range(4):
        for stage in ("rollout", "summarise", "teacher", "train"):
            assert f"{stage}/{i:03d}" in labels
    assert "evaluate/iter-001" in labels and labels[-2:] == ["checkpoint", "evaluate/after"]
    _, rows = cat.query("SELECT manifest_json FROM artifacts WHERE stage = 'teacher'")
    pis = [json.loads(r[0])["pi"] for r in rows]
    assert all(p["with_feedback"] == 1.0 for p in pis) and all("skills" in p for p in pis)
    _, rows = cat.query("SELECT count(DISTINCT iteration) FROM rollouts")
    assert rows[0][0] == 4


@pytest.mark.timeout(300)
def test_online_sigkill_resumes_after_last_completed_iteration(tiny_model_dir, tmp_path):
    from opsd.flows.online import online_flow

    data = write_dataset(tmp_path / "data.jsonl")
    cfg = online_config(tiny_model_dir, data, iterations=5)
    cfg["online"]["eval_every"] = 0
    cfg["online"]["resume_min_interval_s"] = 0  # a resume point after every iteration
    # Reference: one uninterrupted run in its own root.
    online_flow(config=cfg, root=str(tmp_path / "ref"), show_progress=False)
    reference = _final_weights(tmp_path / "ref")

    recipe = tmp_path / "online.yaml"
    recipe.write_text(json.dumps(cfg))
    root = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root", str(root),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if (root / "catalog.duckdb").exists():
            try:
                _, rows = _cat(root).query(
                    "SELECT label FROM stages WHERE status='completed' AND label LIKE 'train/%'")
            except Exception:
                rows = []
            if len(rows) >= 2:
                os.killpg(proc.pid, signal.SIGKILL)  # mid-iteration 2 at the latest, with Prefect's server
                killed_after = len(rows)
                break
        time.sleep(0.2)
    proc.wait()
    assert killed_after is not None, "the online run finished or stalled before it could be killed"

    online_flow(config=cfg, root=str(root), show_progress=False)
    cat = _cat(root)
    resumed = cat.runs()[-1]
    stages = {s["label"]: s for s in cat.stages(resumed["run_id"])}
    for i in range(killed_after):  # completed iterations are reused, not recomputed
        assert stages[f"train/{i:03d}"]["cached"] and stages[f"rollout/{i:03d}"]["cached"]
    assert not stages["train/004"]["cached"]
    resumed_weights = _final_weights(root)
    for k, v in reference.items():
        torch.testing.assert_close(resumed_weights[k], v, atol=1e-5, rtol=1e-4)


def test_online_stop_at_ends_at_the_first_evaluation_reaching_it(tiny_model_dir, tmp_path):
    from opsd.flows.online import online_flow

    data = write_dataset(tmp_path / "data.jsonl")
    # compliance ≥ 0 holds at the first periodic evaluation (iteration 1 with eval_every=2)
    cfg = online_config(tiny_model_dir, data, iterations=6, online={"stop_at": 0.0})
    metrics = online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    cat = _cat(tmp_path / "home")
    labels = [s["label"] for s in cat.stages(cat.runs()[-1]["run_id"])]
    assert "train/001" in labels and "train/002" not in labels
    assert labels[-2:] == ["checkpoint", "evaluate/after"]
    assert metrics["online.iterations"] == 2.0
    curve = json.loads((Layout.at(tmp_path / "home").run_dir(cat.runs()[-1]["run_id"])
                        / "curve.json").read_text())
    assert curve[-1]["iteration"] == 1


def _perturbed_copy(model_dir: Path, dest: Path) -> Path:
    """Another model with the same tokenizer (an external teacher): the tiny model, weights moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("kind", ["live-jsd", "ema", "external"])
def test_online_teacher_kinds_end_to_end(kind, tiny_model_dir, tmp_path):
    """Every teacher kind through a real online flow: who scores each iteration (the teacher
    stage's teacher key) follows the kind, and OPSD as published — a live teacher (the current
    student with its privileged context) and a full-vocabulary divergence — trains online."""
    from opsd.flows.online import online_flow
    from opsd.pool import base_policy

    data = write_dataset(tmp_path / "data.jsonl")
    over = {"live-jsd": dict(teacher={"topk": 4, "kind": "live"},
                             train={"objective": "jsd", "divergence": {"jsd_beta": 0.5}}),
            "ema": dict(teacher={"topk": 4, "kind": "ema", "ema_rate": 0.5}),
            "external": dict(teacher={"topk": 4, "kind": "external", "model": {
                "name": str(_perturbed_copy(tiny_model_dir, tmp_path / "teacher-model"))}})}[kind]
    cfg = online_config(tiny_model_dir, data, iterations=3, **over)
    cfg["online"]["eval_every"] = 0
    metrics = online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    assert "eval.after.greedy" in metrics
    cat = _cat(tmp_path / "home")
    run = cat.runs()[-1]
    assert run["status"] == "completed"
    man = {}
    for label in [f"{s}/{i:03d}" for i in range(3) for s in ("teacher", "train")]:
        key = next(s["key"] for s in cat.stages(run["run_id"]) if s["label"] == label)
        man[label] = cat.artifact(key)["manifest"]
    base_key = base_policy(Path(tiny_model_dir)).key
    for i in range(3):
        teacher_key = man[f"teacher/{i:03d}"]["inputs"]["teacher"]
        student_key = man[f"train/{i:03d}"]["inputs"]["init"]  # the student that sampled iteration i
        if kind == "live-jsd":
            assert teacher_key == student_key
            assert man[f"train/{i:03d}"]["live_teacher"] is True
        elif kind == "ema":
            assert teacher_key == f"ema0.5-{student_key}"
        else:
            external = base_policy(tmp_path / "teacher-model").key
            assert teacher_key == external != base_key
    assert man["train/000"]["inputs"]["init"] == base_key
    assert np.isfinite(man["train/002"]["final_loss"])
