"""The MLflow tracker against a real SQLite store."""

from __future__ import annotations

import shutil

from opsd.storage.tracking import Tracker


def test_a_fresh_home_at_a_path_used_before_in_this_process_is_writable(tmp_path):
    # MLflow caches a store and an engine per URI for the process; a deleted and recreated
    # SQLite file must not be written through the stale engine ("readonly database").
    home = tmp_path / "home"
    first = Tracker(home / "mlflow.db", home / "mlartifacts")
    first.start_pipeline("first", {"a": 1}, {})
    shutil.rmtree(home)
    second = Tracker(home / "mlflow.db", home / "mlartifacts")
    run_id = second.start_pipeline("second", {"a": 2}, {})
    stage = second.start_stage("train", {"lr": 1e-3}, {})
    assert second.client.get_run(stage).data.tags["mlflow.parentRunId"] == run_id
    assert [r.info.run_name for r in second.client.search_runs([second.experiment_id])] \
        == ["train", "second"]
