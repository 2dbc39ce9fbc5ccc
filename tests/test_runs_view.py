"""The comparable set of runs: headline metric names, recipe tags, the shared MLflow runs view and
the URLs `opsd ui` prints (pure functions and a real MLflow SQLite store; no server)."""

from __future__ import annotations

import json

from opsd.storage.mlflow_ui import (JOB_EXECUTION_ENV, browse_host, run_url, runs_url,
                                    server_env)
from opsd.storage.tracking import (RUNS_VIEW_KEY, SHARED_VIEW_TAG, Tracker, headline_keys,
                                   recipe_tags, runs_view_state)

LOGGED = ["eval.after.greedy", "eval.teacher.greedy", "eval.before.greedy", "wall_seconds",
          "eval.before.greedy.b-task", "eval.after.greedy.b-task", "eval.teacher.greedy.b-task",
          "eval.after.greedy.a", "eval.before.greedy.a", "eval.after.pass_at_4", "stages_run",
          "retention.logprob_delta", "retention.exact_match", "online.iterations"]


def test_headline_keys_read_macro_wall_per_task_retention():
    assert headline_keys(LOGGED) == [
        "eval.before.greedy", "eval.after.greedy", "eval.teacher.greedy", "wall_seconds",
        "eval.before.greedy.a", "eval.after.greedy.a",  # no teacher figure for task a: left out
        "eval.before.greedy.b-task", "eval.after.greedy.b-task", "eval.teacher.greedy.b-task",
        "retention.exact_match", "retention.logprob_delta"]
    assert headline_keys([]) == []


def test_recipe_tags_name_the_recipe_and_its_objective():
    cfg = {"name": "pw-opsd", "train": {"objective": "forward_kl_topk", "trace": {"enabled": False}}}
    assert recipe_tags(cfg) == {"opsd.recipe": "pw-opsd", "opsd.objective": "forward_kl_topk"}
    # TRACE routes by spans and ignores train.objective
    cfg["train"]["trace"]["enabled"] = True
    assert recipe_tags(cfg)["opsd.objective"] == "trace"


def test_runs_view_puts_recipe_objective_and_headline_first():
    view = runs_view_state(LOGGED)
    assert view["selectedColumns"][:6] == [
        "tags.`opsd.recipe`", "tags.`opsd.objective`", "metrics.`eval.before.greedy`",
        "metrics.`eval.after.greedy`", "metrics.`eval.teacher.greedy`", "metrics.`wall_seconds`"]
    assert view["columnOrder"] == view["selectedColumns"]
    assert set(view["columnWidths"]) == set(view["selectedColumns"])
    assert "metrics.`stages_run`" not in view["selectedColumns"]


def test_urls_open_the_model_training_view():
    base = "http://127.0.0.1:5000"
    assert runs_url(base, "3") == (f"{base}/#/experiments/3/runs?workflowType=machine_learning"
                                   f"&viewStateShareKey={RUNS_VIEW_KEY}")
    assert run_url(base, "3", "abc") == f"{base}/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert browse_host("0.0.0.0") == "127.0.0.1" and browse_host("localhost") == "localhost"


def test_job_workers_off_unless_the_user_turned_them_on():
    assert server_env({"PATH": "/bin"})[JOB_EXECUTION_ENV] == "false"
    assert server_env({JOB_EXECUTION_ENV: "true"})[JOB_EXECUTION_ENV] == "true"


def test_finishing_a_pipeline_run_publishes_the_view(tmp_path):
    tracker = Tracker(tmp_path / "mlflow.db", tmp_path / "mlartifacts")
    parent = tracker.start_pipeline("r-1", {"name": "r"}, {"opsd.recipe": "r", "opsd.objective": "nll"})
    stage = tracker.start_stage("train", {}, {})
    tracker.log_metrics(stage, {"loss": 1.0, "eval.after.greedy.stage-only": 0.5})
    tracker.end(stage)
    tracker.finish_pipeline({"eval.after.greedy": 0.5, "eval.after.greedy.x": 1.0, "wall_seconds": 3.0})
    exp = tracker.client.get_experiment(tracker.experiment_id)
    view = json.loads(exp.tags[SHARED_VIEW_TAG + RUNS_VIEW_KEY])
    # from the pipeline run only: a stage run's metrics are not columns of the runs table
    assert view == runs_view_state(["eval.after.greedy", "eval.after.greedy.x", "wall_seconds"])
    assert tracker.client.get_run(parent).info.status == "FINISHED"
