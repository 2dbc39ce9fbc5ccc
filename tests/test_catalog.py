"""The catalog's stage protocol in two transactions (begin / finish) on a real DuckDB file, and
Parquet views created once yet showing every artifact published after them."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from opsd.storage.layout import Layout
from opsd.storage.catalog import Catalog


def _catalog(tmp_path) -> Catalog:
    return Catalog(Layout.at(tmp_path))


def _publish(tmp_path, key: str, n: int) -> dict:
    path = tmp_path / "artifacts" / "rollout" / key
    path.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": [f"{key}-{i}" for i in range(n)]}), path / "part-00000.parquet")
    return dict(key=key, stage="rollout", kind="rollout", path=path, rows=n, nbytes=1, content_hash="h",
                producer_run_id="run", manifest={"samples": n})


def _status(cat: Catalog, key: str):
    _, rows = cat.query("SELECT status FROM artifacts WHERE key = ?", [key])
    return rows[0][0] if rows else None


def test_a_fresh_stage_is_announced_then_completed_with_its_stage_row(tmp_path):
    cat = _catalog(tmp_path)
    found, announced = cat.begin_stage("run", "rollout", "rollout", "k1", reuse=True, kind="rollout",
                                       path=tmp_path / "artifacts" / "rollout" / "k1")
    assert found is None and announced and _status(cat, "k1") == "publishing"
    assert cat.artifact("k1") is None  # never reused while publishing
    cat.finish_stage("run", "rollout", "completed", seconds=1.0, artifact=_publish(tmp_path, "k1", 3))
    assert _status(cat, "k1") == "complete"
    assert cat.artifact("k1")["manifest"] == {"samples": 3}
    assert cat.stages("run")[0]["status"] == "completed"
    # the next run finds it in the same transaction that marks its stage running
    found, announced = cat.begin_stage("run2", "rollout", "rollout", "k1", reuse=True, kind="rollout",
                                       path=tmp_path / "x")
    assert found["key"] == "k1" and not announced


def test_a_failed_stage_marks_its_announced_artifact_failed(tmp_path):
    cat = _catalog(tmp_path)
    cat.begin_stage("run", "teacher", "teacher", "k2", reuse=True, kind="teacher", path=tmp_path / "k2")
    cat.finish_stage("run", "teacher", "failed", error="boom")
    assert _status(cat, "k2") == "failed" and cat.artifact("k2") is None


def test_a_forced_recompute_leaves_the_complete_artifact_usable_until_it_publishes(tmp_path):
    cat = _catalog(tmp_path)
    cat.begin_stage("run", "rollout", "rollout", "k3", reuse=True, kind="rollout", path=tmp_path / "k3")
    cat.finish_stage("run", "rollout", "completed", artifact=_publish(tmp_path, "k3", 2))
    found, announced = cat.begin_stage("run2", "rollout", "rollout", "k3", reuse=False, kind="rollout",
                                       path=tmp_path / "k3")
    assert found is None and not announced  # the pipeline records 'publishing' right before the move
    assert _status(cat, "k3") == "complete"


def test_views_are_created_once_and_see_later_artifacts(tmp_path):
    cat = _catalog(tmp_path)
    for i, key in enumerate(("a1", "a2", "a3")):
        cat.begin_stage("run", f"rollout/{i}", "rollout", key, reuse=True, kind="rollout",
                        path=tmp_path / key)
        cat.finish_stage("run", f"rollout/{i}", "completed", artifact=_publish(tmp_path, key, i + 1))
        _, rows = cat.query("SELECT artifact_key, count(*) FROM rollouts GROUP BY 1 ORDER BY 1")
        assert rows == [(k, j + 1) for j, k in enumerate(("a1", "a2", "a3")[: i + 1])]
    _, defs = cat.query("SELECT view_name FROM view_defs")
    assert [d[0] for d in defs] == ["rollouts"]  # written once, when the first rollout appeared
    cat.refresh_views()  # the explicit refresh still recreates
    assert cat.query("SELECT count(*) FROM rollouts")[1] == [(6,)]
