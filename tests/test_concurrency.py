"""Two pipeline runs at once against one artifact root — two `opsd run`s, and `opsd run` beside
`opsd stage` — and readers work while they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsd.cli import app
from opsd.storage.catalog import Catalog
from opsd.storage.integrity import verify_root
from opsd.storage.layout import Layout
from tests.helpers import tiny_config, write_dataset


@pytest.mark.timeout(900)
def test_two_runs_share_a_root_and_readers_never_block(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    root = tmp_path / "home"
    recipes = []
    for i, lr in enumerate((1e-3, 2e-3)):
        cfg = tiny_config(tiny_model_dir, data)
        cfg["name"] = f"concurrent-{i}"
        cfg["train"]["lr"] = lr
        path = tmp_path / f"r{i}.yaml"
        path.write_text(json.dumps(cfg))
        recipes.append(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "opsd.cli", "run", str(r), "--root", str(root),
                          "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for r in recipes
    ]
    reads = 0
    while any(p.poll() is None for p in procs):
        if (root / "catalog.duckdb").exists():
            res = CliRunner().invoke(app, ["runs", "--json", "--root", str(root)])
            assert res.exit_code == 0, res.output
            res = CliRunner().invoke(app, ["query", "SELECT count(*) FROM stages", "--root", str(root)])
            assert res.exit_code == 0, res.output
            reads += 1
        time.sleep(0.5)
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert reads >= 3
    runs = json.loads(CliRunner().invoke(app, ["runs", "--json", "--root", str(root)]).output)
    assert sorted(r["name"] for r in runs) == ["concurrent-0", "concurrent-1"]
    assert all(r["status"] == "completed" for r in runs)
    # shared upstream stages were computed once or reused, never corrupted
    assert verify_root(Layout.at(root)).ok


def _opsd(*args: str, root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "opsd.cli", *args, "--root", str(root),
                             "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(900)
def test_opsd_run_and_opsd_stage_on_one_root_at_once(tiny_model_dir, tmp_path):
    """`opsd stage train --run A --set train.lr=X` and `opsd run RECIPE --set train.lr=X` at the
    same time need the same new train artifact: one computes it, the other waits and reuses
    it; both finish, and every artifact of the root still matches its hashes."""
    data = write_dataset(tmp_path / "data.jsonl")
    root = tmp_path / "home"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_config(tiny_model_dir, data)))
    first = _opsd("run", str(recipe), root=root)
    out = first.communicate()[0]
    assert first.returncode == 0, out
    source = Catalog(Layout.at(root)).runs()[0]["run_id"]
    procs = [_opsd("stage", "train", "--run", source, "--set", "train.lr=2e-3", root=root),
             _opsd("run", str(recipe), "--set", "train.lr=2e-3", root=root)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cat = Catalog(Layout.at(root))
    runs = [r for r in cat.runs() if r["run_id"] != source]
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)
    assert [r["parent_run_id"] for r in runs].count(source) == 1  # the stage rerun's parent
    trains = [next(s for s in cat.stages(r["run_id"]) if s["label"] == "train") for r in runs]
    assert trains[0]["key"] == trains[1]["key"]
    assert sorted(bool(t["cached"]) for t in trains) == [False, True], trains
    for r in runs:  # the upstream stages were reused by both, never recomputed
        assert all(s["cached"] for s in cat.stages(r["run_id"])
                   if s["label"] in ("dataset", "rollout", "teacher")), r["run_id"]
    report = verify_root(Layout.at(root))
    assert report.ok and not report.unfinished, report.lines()
