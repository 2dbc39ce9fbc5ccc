"""A real Prefect flow run of the offline pipeline on a tiny model, checked through the
real DuckDB catalog, the real MLflow SQLite store and the Parquet artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from opsd.cli import app
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from tests.helpers import LABELS, tiny_config, write_dataset

@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, tmp_path_factory):
    from opsd.flows.offline import offline_flow

    base = tmp_path_factory.mktemp("offline")
    data = write_dataset(base / "data.jsonl")
    cfg = tiny_config(tiny_model_dir, data)
    root = base / "home"
    metrics = offline_flow(config=cfg, root=str(root), show_progress=False)
    yield {"root": root, "cfg": cfg, "metrics": metrics, "base": base}
    shutil.rmtree(base, ignore_errors=True)  # small CI disks


def _catalog(root: Path) -> Catalog:
    layout = Layout.at(root)
    return Catalog(layout)


def test_flow_records_every_stage_in_catalog(pipeline_run):
    cat = _catalog(pipeline_run["root"])
    (run,) = cat.runs()
    assert run["status"] == "completed"
    stages = cat.stages(run["run_id"])
    assert [s["label"] for s in stages] == LABELS
    assert all(s["status"] == "completed" and not s["cached"] for s in stages)
    for key in ("eval.before.greedy", "eval.after.greedy", "eval.teacher.greedy", "eval.after.pass_at_2"):
        assert key in run["metrics"]
    cols, rows = cat.query("SELECT stage, path, bytes, hash FROM artifacts WHERE status='complete'")
    assert len(rows) == 7
    for stage, path, nbytes, digest in rows:
        assert Path(path).is_dir() and nbytes > 0 and digest
        assert (Path(path) / "manifest.json").exists()
    # nothing half-written left behind
    assert not [p for p in Layout.at(pipeline_run["root"]).tmp.iterdir() if p.name.startswith("rollout")]


def test_parquet_contracts(pipeline_run):
    cat = _catalog(pipeline_run["root"])
    _, rows = cat.query("SELECT count(*), sum(len(response_ids)), "
                        "bool_and(len(response_ids) = len(behaviour_logprobs)) FROM rollouts")
    n, tokens, aligned = rows[0]
    assert n == 6 * 2 and aligned and tokens > 0
    _, rows = cat.query(
        "SELECT bool_and(len(t.topk_ids) = r.n_tokens), bool_and(len(t.topk_ids[1]) = 4), "
        "bool_and(len(t.tail_mass) = r.n_tokens) FROM teacher_targets t JOIN rollouts r USING (sample_id)")
    assert rows[0] == (True, True, True)
    # the share of each task's replies cut at max_new_tokens, and the run-log note it feeds
    from opsd.flows.steps import truncation_note

    ro_dir = next(Path(pipeline_run["root"], "artifacts", "rollout").iterdir())
    ro = pq.read_table(ro_dir / "part-00000.parquet").to_pydict()
    manifest = json.loads((ro_dir / "manifest.json").read_text())
    for task, share in manifest["truncated_by_task"].items():
        finishes = [f for t, f in zip(ro["task"], ro["finish_reason"]) if (t or "all") == task]
        assert share == pytest.approx(finishes.count("length") / len(finishes))
    assert truncation_note({"truncated_by_task": {"a": 0.25, "b": 0.64}}, 64) == (
        "replies cut at rollout.max_new_tokens=64 (by task: b 64%); how a reply ends is taught "
        "only on the replies that stop")
    assert truncation_note({"truncated_by_task": {"a": 0.1}}, 64) is None
    assert truncation_note({}, 64) is None  # a rollout artifact from before the figure
    # per-position teacher-student gap, as a user would ask it
    cols, rows = cat.query("SELECT pos, avg(teacher_logprob - student_logprob) AS gap, count(*) "
                           "FROM teacher_tokens GROUP BY pos ORDER BY pos")
    assert [r[0] for r in rows] == list(range(len(rows))) and rows[0][2] == 12
    # token ids are stored as sampled and the teacher scored exactly those ids
    from opsd.stages.common import ids_hash

    r = pq.read_table(next(Path(pipeline_run["root"], "artifacts", "rollout").glob("*/part-00000.parquet")))
    t_dir = next(Path(pipeline_run["root"], "artifacts", "teacher").iterdir())
    t = pq.read_table(t_dir / "part-00000.parquet").to_pydict()
    hashes = dict(zip(t["sample_id"], t["response_hash"]))
    for sid, ids in zip(r.column("sample_id").to_pylist(), r.column("response_ids").to_pylist()):
        if sid in hashes:
            assert hashes[sid] == ids_hash(ids)


def test_rule_misses_reads_a_run_from_its_catalog(pipeline_run, tmp_path):
    """bench/rule_misses.py on a real run: the data, checkpoint and replies come from the catalog
    and every greedy reply to a row with a literal rule (``^\\s*Sure``) is scored."""
    from bench.rule_misses import main
    from opsd.storage.parquet import read_table

    run_id = _catalog(pipeline_run["root"]).runs()[0]["run_id"]
    recs = main(["--root", str(pipeline_run["root"]), "--run", run_id[:15], "--out",
                 str(tmp_path / "misses.json")])
    assert len(recs) == 4 and {r["label"] for r in recs} == {"evaluate/after"}
    assert {(r["where"], r["rule"]) for r in recs} == {("start", "Sure")}
    after = next(s for s in _catalog(pipeline_run["root"]).stages(run_id) if s["label"] == "evaluate/after")
    t = read_table(Path(_catalog(pipeline_run["root"]).artifact(after["key"])["path"])).to_pydict()
    passed = {rid: p for rid, p, g in zip(t["row_id"], t["passed"], t["greedy"]) if g}
    assert {r["row_id"]: r["passed"] for r in recs} == passed
    assert json.loads((tmp_path / "misses.json").read_text()) == recs


def test_mlflow_parent_and_nested_stage_runs(pipeline_run):
    from mlflow.tracking import MlflowClient

    from opsd.storage.tracking import tracking_uri

    client = MlflowClient(tracking_uri(Layout.at(pipeline_run["root"]).mlflow_db))
    exp = client.get_experiment_by_name("opsd")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == sorted(LABELS)
    assert parent.data.params["train.objective"] == "forward_kl_topk"
    assert "eval.after.greedy" in parent.data.metrics
    train = next(c for c in children if c.info.run_name == "train")
    history = client.get_metric_history(train.info.run_id, "loss")
    assert len(history) == 6  # 2 epochs x ceil(6*2/4) steps, logged live per step
    arts = {a.path for a in client.list_artifacts(train.info.run_id, "plots")}
    assert "plots/training_curves.png" in arts
    parent_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/compliance.png", "plots/position_gap.png"} <= parent_arts
    # the trained checkpoint is an MLflow transformers model with its own weights
    import mlflow.transformers

    uri = train.data.tags["opsd.model_uri"]
    mlflow.set_tracking_uri(tracking_uri(Layout.at(pipeline_run["root"]).mlflow_db))
    try:
        pipe = mlflow.transformers.load_model(uri)
    finally:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI, which opsd's tracker honours:
        # left set, every later run in this process would log into this test's store
        mlflow.set_tracking_uri(None)
    assert pipe.model.config.num_hidden_layers == 2


def test_mlflow_eval_samples_table_holds_every_verdict(pipeline_run):
    """Each evaluation's MLflow run carries its per-sample table (greedy + k sampled replies of
    every eval row, with the verdict), the same rows as its eval_samples Parquet."""
    from mlflow.tracking import MlflowClient

    from opsd.storage.tracking import tracking_uri

    client = MlflowClient(tracking_uri(Layout.at(pipeline_run["root"]).mlflow_db))
    exp = client.get_experiment_by_name("opsd")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    n_eval, samples = 4, pipeline_run["cfg"]["eval"]["samples"]
    for label in ("evaluate/before", "evaluate/teacher", "evaluate/after"):
        run_id = runs[label].info.run_id
        table = json.loads(Path(client.download_artifacts(run_id, "eval_samples.json")).read_text())
        cols = table["columns"]
        assert {"row_id", "task", "greedy", "passed", "finish_reason", "text"} <= set(cols)
        data = [dict(zip(cols, row)) for row in table["data"]]
        assert len(data) == n_eval * (1 + samples)
        assert sum(d["greedy"] for d in data) == n_eval
        assert all(isinstance(d["passed"], bool) for d in data)
        art = Path(runs[label].data.tags["opsd.artifact_path"])
        parquet = pq.read_table(art / "part-00000.parquet").to_pydict()
        assert sorted(zip(parquet["row_id"], parquet["passed"])) == sorted(
            (d["row_id"], d["passed"]) for d in data)


def test_rerun_reuses_every_stage(pipeline_run):
    from opsd.flows.offline import offline_flow

    offline_flow(config=pipeline_run["cfg"], root=str(pipeline_run["root"]), show_progress=False)
    cat = _catalog(pipeline_run["root"])
    second = cat.runs()[-1]
    stages = cat.stages(second["run_id"])
    assert [s["label"] for s in stages] == LABELS
    assert all(s["cached"] and s["status"] == "cached" for s in stages)
    assert second["metrics"]["stages_cached"] == 7


def test_stage_rerun_with_new_objective_runs_only_train_and_after(pipeline_run):
    root = pipeline_run["root"]
    first = _catalog(root).runs()[0]["run_id"]
    res = CliRunner().invoke(app, ["stage", "train", "--run", first, "--force", "--no-progress",
                                   "--set", "train.objective=reverse_kl_sampled", "--root", str(root)])
    assert res.exit_code == 0, res.output
    cat = _catalog(root)
    rerun = cat.runs()[-1]
    assert rerun["parent_run_id"] == first and rerun["config"]["train"]["objective"] == "reverse_kl_sampled"
    ran = {s["label"] for s in cat.stages(rerun["run_id"]) if not s["cached"]}
    assert ran == {"train", "evaluate/after"}


def test_stage_rerun_data_parallel_under_torchrun(pipeline_run):
    """`--set train.world_size=2` reruns train as 2 gloo ranks; the result is published like any."""
    root = pipeline_run["root"]
    first = _catalog(root).runs()[0]["run_id"]
    res = CliRunner().invoke(app, ["stage", "train", "--run", first, "--force", "--no-progress",
                                   "--set", "train.world_size=2", "--root", str(root)])
    assert res.exit_code == 0, res.output
    cat = _catalog(root)
    rerun = cat.runs()[-1]
    train = next(s for s in cat.stages(rerun["run_id"]) if s["label"] == "train")
    assert not train["cached"]
    folder = Layout.at(root).artifact_dir("train", train["key"])
    assert (folder / "model" / "model.safetensors").exists() and (folder / "dist.log").exists()
    assert json.loads((folder / "manifest.json").read_text())["world_size"] == 2


def test_cli_runs_json_and_query(pipeline_run):
    root = str(pipeline_run["root"])
    res = CliRunner().invoke(app, ["runs", "--json", "--root", root])
    assert res.exit_code == 0
    runs = json.loads(res.output)
    assert {"run_id", "status", "metrics"} <= set(runs[0])
    assert isinstance(runs[0]["metrics"]["eval.after.greedy"], float)
    res = CliRunner().invoke(app, ["query", "SELECT count(*) AS n FROM eval_samples", "--root", root,
                                   "-f", "json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["n"] > 0
    res = CliRunner().invoke(app, ["query", "SELECT * FROM no_such_view", "--root", root])
    assert res.exit_code == 2 and "views:" in res.output
