"""Services that fail mid-run: no computed artifact is lost.

* The MLflow store (SQLite) is broken while a stage runs: the run goes on, every stage is
  published and catalogued, the run is marked ``tracking = 'lost: …'``; ``opsd track --run ID``
  (or the next run, once the store works) logs what MLflow missed, and a second catch-up logs
  nothing twice.
* Prefect's temporary server is killed while ``opsd run`` trains: the run finishes, its
  artifacts and catalog are complete, and the process exits (Prefect alone would wait for the
  dead server forever) with a message saying what was lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from opsd.cli import app
from opsd.config import PipelineConfig
from opsd.flows.runner import Pipeline
from opsd.storage.catalog import Catalog
from opsd.storage.integrity import verify_root
from opsd.storage.layout import Layout
from opsd.storage.tracking import Tracker
from tests.helpers import tiny_config, write_dataset

REPO = Path(__file__).resolve().parent.parent


def _write(n: int):
    def fn(ctx):
        pq.write_table(pa.table({"x": list(range(n))}), ctx.out_dir / "part-00000.parquet")
        return {"rows": n, "loss": 0.5}
    return fn


def _break_store(db: Path):
    """A stage that, while it runs, overwrites the SQLite header of the MLflow store in place
    (what a full disk or a bad copy does to it): every later MLflow call fails."""
    inner = _write(5)

    def fn(ctx):
        with db.open("r+b") as fh:
            fh.write(b"\0" * 100)
        return inner(ctx)
    return fn


def _run_with_broken_store(root: Path) -> tuple[Pipeline, list[str]]:
    said: list[str] = []
    p = Pipeline(PipelineConfig(), root, show_progress=False, logger=said.append)
    p.start()
    # stage names of their own: the catalog's SQL views expect the real stages' columns
    p.stage("first", "first", {"a": 1}, {}, _write(3))
    p.stage("second", "second", {"b": 1}, {}, _break_store(Layout.at(root).mlflow_db))
    p.stage("third", "third", {"c": 1}, {}, _write(7))
    p.finish("completed")
    return p, said


def _mlflow_stages(root: Path, run_id: str) -> dict[str, str]:
    layout = Layout.at(root)
    t = Tracker(layout.mlflow_db, layout.mlflow_artifacts)
    runs = t.client.search_runs([t.experiment_id], f"tags.`opsd.run_id` = '{run_id}'")
    return {r.data.tags.get("opsd.stage", "pipeline"): r.info.status for r in runs}


def test_a_broken_mlflow_store_loses_no_artifact_and_opsd_track_catches_up(tmp_path):
    p, said = _run_with_broken_store(tmp_path)
    cat = Catalog(Layout.at(tmp_path))
    assert [s["status"] for s in cat.stages(p.run_id)] == ["completed"] * 3
    assert all(cat.artifact(s["key"]) for s in cat.stages(p.run_id))
    assert cat.run(p.run_id)["status"] == "completed"
    _, rows = cat.query("SELECT tracking FROM runs WHERE run_id = ?", [p.run_id])
    assert rows[0][0].startswith("lost: "), rows
    assert sum("MLflow tracking stopped" in m for m in said) == 1, said  # said once, not per call
    assert verify_root(Layout.at(tmp_path)).ok

    # the store still broken: opsd track says so (exit 1) and keeps the mark
    res = CliRunner().invoke(app, ["track", "--run", p.run_id, "--root", str(tmp_path)])
    assert res.exit_code == 1 and "MLflow still fails" in res.output, res.output
    # the user replaces the broken file: the catch-up writes the run from the catalog
    Layout.at(tmp_path).mlflow_db.unlink()
    res = CliRunner().invoke(app, ["track", "--run", p.run_id, "--root", str(tmp_path)])
    assert res.exit_code == 0 and "3 stage(s) logged" in res.output, res.output
    assert _mlflow_stages(tmp_path, p.run_id) == {
        "pipeline": "FINISHED", "first": "FINISHED", "second": "FINISHED", "third": "FINISHED"}
    _, rows = cat.query("SELECT tracking FROM runs WHERE run_id = ?", [p.run_id])
    assert rows[0][0] == "ok"
    again = CliRunner().invoke(app, ["track", "--run", p.run_id, "--root", str(tmp_path)])
    assert "0 stage(s) logged, 3 already there" in again.output, again.output


def test_the_next_run_catches_up_a_run_whose_tracking_was_lost(tmp_path):
    lost, _ = _run_with_broken_store(tmp_path)
    Layout.at(tmp_path).mlflow_db.unlink()
    said: list[str] = []
    p = Pipeline(PipelineConfig(), tmp_path, show_progress=False, logger=said.append)
    p.start()
    p.finish("completed")
    assert any(f"caught up run {lost.run_id}" in m for m in said), said
    assert set(_mlflow_stages(tmp_path, lost.run_id)) == {"pipeline", "first", "second", "third"}


def _prefect_server(session: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session:
                continue
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ProcessLookupError):
            continue
        if b"uvicorn" in cmd and b"prefect" in cmd:
            return int(d.name)
    return None


@pytest.mark.timeout(1200)
def test_prefect_server_killed_mid_run_loses_nothing_and_the_run_exits(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_config(tiny_model_dir, data)))
    root = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # the temporary server this run starts is the one to kill
    proc = subprocess.Popen([sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root",
                             str(root), "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and killed is None:
        if (root / "tmp").exists() and any((root / "tmp").glob("train-*")):
            killed = _prefect_server(proc.pid)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed, "the run's Prefect server was not found during training"
    try:
        out = proc.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("opsd run did not exit after its Prefect server died")
    assert proc.returncode == 0, out[-4000:]
    assert "Prefect's API became unreachable" in out and "The run completed" in out, out[-3000:]
    cat = Catalog(Layout.at(root))
    run = cat.runs()[-1]
    assert run["status"] == "completed"
    assert all(s["status"] == "completed" for s in cat.stages(run["run_id"]))
    report = verify_root(Layout.at(root))
    assert report.ok and not report.unfinished, report.lines()
