"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API: the
fluent active-run stack is per thread, and Prefect runs tasks in worker threads.
The default store is SQLite inside the artifact root (MLflow 3 refuses the old
file store); set ``MLFLOW_TRACKING_URI`` to use a server instead.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from filelock import FileLock

EXPERIMENT = "opsd"

# MLflow validates params: 500 chars per value (6000 on recent servers), 250 chars per key.
_MAX_PARAM = 500
_SECRET_HINTS = ("token", "secret", "password", "api_key", "apikey", "credential")


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics and ``_ - . : / space``: ``pass@4`` → ``pass_at_4``."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def tracking_uri(mlflow_db: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(mlflow_db).resolve()}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def safe_params(params: dict) -> dict[str, str]:
    """Flattened params with anything that looks like a secret redacted."""
    out = {}
    for k, v in flatten(params).items():
        if any(h in k.lower() for h in _SECRET_HINTS):
            v = "<redacted>"
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        out[k[:250]] = text[:_MAX_PARAM]
    return out


# ----------------------------------------------------------------- comparing recipes
# Runs of different recipes on the same data form one comparable set: every pipeline run carries
# the same two tags and the same headline metric names, and one shared view of the runs table
# shows exactly those as columns (MLflow UI and `opsd runs --compare` read the same names).

RECIPE_TAGS = ("opsd.recipe", "opsd.objective")
# A shared view is an experiment tag ``mlflow.sharedViewState.<key>`` holding the runs table's
# state as JSON; the UI applies it when the page URL carries ``viewStateShareKey=<key>``.
RUNS_VIEW_KEY = "opsd-runs"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
_POLICIES = ("before", "after", "teacher")
_EVAL_GREEDY = re.compile(r"^eval\.(before|after|teacher)\.greedy(?:\.(.+))?$")


def recipe_tags(config: dict) -> dict[str, str]:
    """``opsd.recipe`` and ``opsd.objective`` of a resolved config (as a plain dict).

    The objective is ``train.objective``, except under TRACE span routing, which ignores it.
    """
    train = config.get("train", {})
    objective = "trace" if train.get("trace", {}).get("enabled") else str(train.get("objective", ""))
    return {"opsd.recipe": str(config.get("name", "")), "opsd.objective": objective}


def headline_keys(keys: Iterable[str]) -> list[str]:
    """The metrics a recipe comparison shows, in reading order.

    Greedy pass rate before / after training and of the teacher (macro over tasks), wall time,
    then the same three per task, then any ``retention.*``; names absent from ``keys`` are left
    out, so a run without a teacher ceiling or retention check simply shows fewer.
    """
    keys = set(keys)
    macro = [k for k in (f"eval.{p}.greedy" for p in _POLICIES) if k in keys]
    tasks = sorted({m.group(2) for k in keys if (m := _EVAL_GREEDY.match(k)) and m.group(2)})
    per_task = [k for t in tasks for k in (f"eval.{p}.greedy.{t}" for p in _POLICIES) if k in keys]
    retention = sorted(k for k in keys if k.startswith("retention."))
    wall = ["wall_seconds"] if "wall_seconds" in keys else []
    return macro + wall + per_task + retention


def runs_view_state(metric_keys: Iterable[str]) -> dict:
    """The runs-table state of the shared view: recipe, objective and the headline metrics as
    the first columns after the run name (MLflow column ids: ``tags.`k```, ``metrics.`k```)."""
    tag_cols = [f"tags.`{t}`" for t in RECIPE_TAGS]
    metric_cols = [f"metrics.`{k}`" for k in headline_keys(metric_keys)]
    columns = tag_cols + metric_cols
    # narrower than MLflow's defaults so the headline columns fit beside the run name
    widths = {c: 130 for c in tag_cols} | {c: 125 for c in metric_cols}
    return {"selectedColumns": columns, "columnOrder": columns, "columnWidths": widths}


class _Retrying:
    """MlflowClient proxy retrying SQLite 'database is locked' errors (concurrent runs)."""

    def __init__(self, client, attempts: int = 20):
        self._client = client
        self._attempts = attempts

    def __getattr__(self, name):
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            for i in range(self._attempts):
                try:
                    return fn(*args, **kwargs)
                except Exception as err:  # MlflowException wraps sqlalchemy OperationalError
                    if "locked" not in str(err).lower() or i == self._attempts - 1:
                        raise
                    time.sleep(0.1 * (i + 1))

        return call


def _forget_cached_store(uri: str) -> None:
    """Drop MLflow's per-process store and SQLAlchemy engine for ``uri``.

    MLflow caches both per URI for the life of the process. When the SQLite file was deleted
    since (a fresh OPSD home at a path this process used before: a notebook that removed
    ``opsd-home``, a test reusing a temporary folder), the cached engine still points at the
    unlinked file and every write fails with "attempt to write a readonly database".
    """
    try:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry
    except ImportError:  # private API moved: nothing cached the way this knows
        return
    for store_cls in (SqlAlchemyStore, RegistryStore):
        engine = getattr(store_cls, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()
    cached = getattr(TrackingStoreRegistry, "_get_store_with_resolved_uri", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


class Tracker:
    """Thin wrapper over ``MlflowClient`` bound to one pipeline (parent) run."""

    def __init__(self, mlflow_db: Path, artifact_root: Path, experiment: str = EXPERIMENT):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(mlflow_db)
        if not Path(mlflow_db).exists():
            _forget_cached_store(self.uri)
        # Creating the SQLite schema and the experiment is not safe for two processes at
        # once (both try CREATE TABLE): serialise the first contact with a file lock.
        Path(mlflow_db).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(Path(mlflow_db).with_name(Path(mlflow_db).name + ".lock")):
            self.client = _Retrying(MlflowClient(tracking_uri=self.uri))
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=Path(artifact_root).resolve().as_uri(),
                    # open on the runs table (not MLflow 3's GenAI overview)
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            else:
                self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    def start_pipeline(self, run_name: str, params: dict, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def finish_pipeline(self, metrics: dict[str, float], status: str = "FINISHED") -> None:
        """Log the pipeline run's headline metrics, refresh the shared runs view, end the run."""
        assert self.parent_id, "start_pipeline first"
        self.log_metrics(self.parent_id, metrics)
        try:
            self.publish_runs_view()
        except Exception as err:  # a table layout must not fail a finished run
            logging.getLogger("opsd").warning("MLflow runs view not updated: %s", err)
        self.end(self.parent_id, status)

    def pipeline_runs(self) -> list:
        """The experiment's pipeline (top-level) runs, newest first."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            runs += [r for r in page if "mlflow.parentRunId" not in r.data.tags]
            token = page.token
            if not token:
                return runs

    def publish_runs_view(self) -> str:
        """Write the shared runs view (:func:`runs_view_state`) over the headline metrics that
        any pipeline run of the experiment has; returns its share key."""
        keys: set[str] = set()
        for run in self.pipeline_runs():
            keys |= set(run.data.metrics)
        state = json.dumps(runs_view_state(keys))
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + RUNS_VIEW_KEY, state)
        return RUNS_VIEW_KEY

    def start_stage(self, label: str, params: dict, tags: dict[str, str]) -> str:
        all_tags = {"mlflow.parentRunId": self.parent_id or "", "opsd.stage": label, **tags}
        run = self.client.create_run(self.experiment_id, run_name=label, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_params(params).items()]
        for i in range(0, len(items), 100):  # the store caps params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(metric_name(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v  # drop NaN
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_table(self, run_id: str, columns: dict[str, list], artifact_file: str) -> None:
        """An MLflow table (shown in the UI's artifact view and Evaluation tab)."""
        self.client.log_table(run_id, data=columns, artifact_file=artifact_file)

    def log_figure(self, run_id: str, fig, artifact_file: str) -> None:
        self.client.log_figure(run_id, fig, artifact_file)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_transformers_model(self, run_id: str, model_dir: Path, artifact_path: str = "model") -> str:
        """Log an HF checkpoint folder as an MLflow `transformers` model; returns its URI.

        The weights are saved into the artifact store (not a hub reference), so
        ``mlflow.transformers.load_model(uri)`` works offline.
        """
        import mlflow.transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        tmp = scratch_dir() / artifact_path
        logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)  # no hub model card
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tok}, path=str(tmp),
            task="text-generation", pip_requirements=["transformers", "torch"],
        )
        self.client.log_artifacts(run_id, str(tmp), artifact_path)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        uri = f"runs:/{run_id}/{artifact_path}"
        self.set_tags(run_id, {"opsd.model_uri": uri})
        return uri


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="opsd-mlflow-"))
