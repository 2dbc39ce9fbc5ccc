"""Two pipeline runs at once against one artifact root; readers work while they write."""

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
    from bench.fault_injection import corruption

    assert corruption(root) == []
