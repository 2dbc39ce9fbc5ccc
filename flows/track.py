"""MLflow tracking that never costs a run its results, and catching it up afterwards.

The catalog and the artifacts are the record of a run; MLflow is its view. When the MLflow store
fails mid-run (a server that went away, a full disk under the SQLite file, a corrupt database),
:class:`GuardedTracker` reports it once and skips tracking for the rest of the run: every stage
still computes, publishes and is catalogued, and the run is marked ``tracking = 'lost: …'``.
:func:`catch_up` later writes what MLflow missed — the parent run with the resolved recipe, one
nested run per stage with the manifest's numbers, the manifest itself and the per-step training
curve — from the catalog alone (``opsd track --run ID``, and every run that starts with a
working store does it for earlier runs whose tracking was lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from opsd.storage.tracking import Tracker, flatten, metric_name, recipe_tags

log = logging.getLogger("opsd")


class GuardedTracker:
    """A :class:`Tracker` whose failures never stop a run.

    The first failing call (any exception: MLflow wraps store errors in several types) is
    reported through ``on_lost`` and makes every later call return None without touching the
    store, so a dead server costs one timeout, not one per metric."""

    def __init__(self, tracker: Tracker, on_lost: Callable[[str], None]):
        self._tracker = tracker
        self._on_lost = on_lost
        self.lost: str | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._tracker, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.lost is not None:
                return None
            try:
                return attr(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - whatever the store raised, the run goes on
                self.lost = f"{type(err).__name__}: {err}".splitlines()[0][:500]
                self._on_lost(self.lost)
                return None

        return call


def manifest_metrics(manifest: dict) -> dict[str, float]:
    """The numbers of a manifest, flattened (what a stage's MLflow run shows as metrics)."""
    out = {}
    for k, v in flatten(manifest).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[k] = float(v)
    return out


@dataclass
class CaughtUp:
    """What :func:`catch_up` wrote for one run."""

    run_id: str
    mlflow_run_id: str = ""
    parent_created: bool = False
    stages_logged: list[str] = field(default_factory=list)
    stages_present: list[str] = field(default_factory=list)


def _existing(tracker: Tracker, mlflow_run_id: str | None):
    if not mlflow_run_id:
        return None
    try:
        return tracker.client.get_run(mlflow_run_id)
    except Exception:  # noqa: BLE001 - missing from this store (a new database, another server)
        return None


def catch_up(layout: Layout, run_id: str, tracker: Tracker | None = None) -> CaughtUp:
    """Log to MLflow whatever of run ``run_id`` it is missing, from the catalog.

    The parent run is reused when the store still has it (else created with the resolved
    recipe as params); a stage whose MLflow run is missing or never ended gets its manifest's
    numbers, ``manifest.json``, the training curve (train stages) and an end state. Idempotent:
    a second call finds every stage present and logs nothing."""
    cat = Catalog(layout)
    run = cat.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in the catalog at {layout.root}; see `opsd runs`")
    tracker = tracker or Tracker(layout.mlflow_db, layout.mlflow_artifacts)
    out = CaughtUp(run["run_id"])
    parent = _existing(tracker, run["mlflow_run_id"])
    if parent is None:
        tags = {"opsd.run_id": run["run_id"], "opsd.mode": run["mode"] or "",
                "opsd.kind": "pipeline", "opsd.caught_up": "true", **recipe_tags(run["config"])}
        if run["parent_run_id"]:
            tags["opsd.parent_run_id"] = run["parent_run_id"]
        out.mlflow_run_id = tracker.start_pipeline(f"{run['name']}-{run['run_id']}",
                                                   run["config"], tags)
        out.parent_created = True
        config = layout.run_dir(run["run_id"]) / "config.yaml"
        if config.exists():
            tracker.log_artifact(out.mlflow_run_id, config)
    else:
        out.mlflow_run_id = tracker.parent_id = parent.info.run_id
    for stage in cat.stages(run["run_id"]):
        mine = None if out.parent_created else _existing(tracker, stage["mlflow_run_id"])
        if mine is not None and mine.info.status == "FINISHED":
            out.stages_present.append(stage["label"])
            continue
        _log_stage(tracker, cat, run["run_id"], stage, mine.info.run_id if mine else None)
        out.stages_logged.append(stage["label"])
    if run["metrics"]:
        tracker.log_metrics(out.mlflow_run_id, run["metrics"])
    if run["status"] != "running":
        tracker.end(out.mlflow_run_id, "FINISHED" if run["status"] == "completed" else "FAILED")
    cat.update_run(run["run_id"], mlflow_run_id=out.mlflow_run_id, tracking="ok")
    return out


def _log_stage(tracker: Tracker, cat: Catalog, run_id: str, stage: dict,
               mlflow_run_id: str | None) -> None:
    record = cat.artifact(stage["key"])
    manifest = record["manifest"] if record else {}
    if mlflow_run_id is None:
        mlflow_run_id = tracker.start_stage(
            stage["label"], {"inputs": manifest.get("inputs", {})},
            {"opsd.key": stage["key"], "opsd.cached": str(bool(stage["cached"])).lower(),
             "opsd.run_id": run_id, "opsd.caught_up": "true"})
    if record is not None:
        tracker.log_metrics(mlflow_run_id, manifest_metrics(manifest))
        tracker.set_tags(mlflow_run_id, {"opsd.artifact_path": record["path"]})
        tracker.log_dict(mlflow_run_id, manifest, "manifest.json")
        curve = Path(record["path"]) / "metrics.parquet"
        if record["stage"] == "train" and not stage["cached"] and curve.exists():
            _log_curve(tracker, mlflow_run_id, curve)
    finished = stage["status"] in ("completed", "cached")
    tracker.end(mlflow_run_id, "FINISHED" if finished else "FAILED")
    cat.set_stage_mlflow_run(run_id, stage["label"], mlflow_run_id)


def _log_curve(tracker: Tracker, mlflow_run_id: str, path: Path) -> None:
    """The per-step training metrics, in batches (one call per step is slow for long runs)."""
    import time

    import pyarrow.parquet as pq
    from mlflow.entities import Metric

    ts, batch = int(time.time() * 1000), []
    for row in pq.read_table(path).to_pylist():
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                batch.append(Metric(metric_name(k), float(v), ts, int(row["step"])))
    for i in range(0, len(batch), 900):
        tracker.client.log_batch(mlflow_run_id, metrics=batch[i : i + 900])


def catch_up_lost(layout: Layout, say: Callable[[str], None], skip: str | None = None) -> None:
    """Catch up every earlier run of the root whose tracking was lost (best effort: a store
    that fails again leaves them marked for the next try)."""
    cat = Catalog(layout)
    for rid in cat.runs_with_lost_tracking():
        if rid == skip:
            continue
        try:
            done = catch_up(layout, rid)
        except Exception as err:  # noqa: BLE001 - the current run must not fail for an old one
            say(f"tracking: run {rid} is still not in MLflow ({type(err).__name__}: {err}); "
                f"retry with `opsd track --run {rid}`")
            continue
        say(f"tracking: caught up run {rid} in MLflow ({len(done.stages_logged)} stages logged)")
