"""The offline pipeline with an explicit ``device: cpu`` (a Prefect flow run on the tiny model):
every stage's manifest, catalog row and MLflow run records the device and its peak memory; the
resolved dtypes, not ``auto``, are in the run's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from opsd.device import auto_dtype
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from tests.helpers import tiny_config, write_dataset


@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, tmp_path_factory):
    from opsd.flows.offline import offline_flow

    base = tmp_path_factory.mktemp("device-cpu")
    cfg = tiny_config(tiny_model_dir, write_dataset(base / "data.jsonl"))
    cfg["device"] = "cpu"
    cfg["train"]["epochs"] = 1
    cfg["eval"]["samples"] = 0
    root = base / "home"
    metrics = offline_flow(config=cfg, root=str(root), show_progress=False)
    yield {"root": root, "metrics": metrics}
    shutil.rmtree(base, ignore_errors=True)


def test_every_stage_records_its_device_and_peak_memory(cpu_run):
    cat = Catalog(Layout.at(cpu_run["root"]))
    (run,) = cat.runs()
    assert run["status"] == "completed"
    _, rows = cat.query("SELECT stage, manifest_json FROM artifacts WHERE status='complete'")
    computed = [(stage, json.loads(m)) for stage, m in rows if stage != "dataset"]
    assert {s for s, _ in computed} >= {"rollout", "teacher", "train", "evaluate"}
    for stage, m in computed:
        assert m["device"] == "cpu", stage
        assert m["peak_memory_gib"] is None or m["peak_memory_gib"] > 0, stage
    train = next(m for s, m in computed if s == "train")
    assert train["autocast"] == auto_dtype(__import__("torch").device("cpu")).dtype.replace(
        "float32", "none")
    assert train["activation_checkpointing"]["checkpointed"] == 0  # auto is off on CPU


def test_resolved_config_is_what_ran(cpu_run):
    layout = Layout.at(cpu_run["root"])
    (run_dir,) = [p for p in layout.runs.iterdir() if p.is_dir()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    fast = auto_dtype(__import__("torch").device("cpu")).dtype
    assert cfg["device"] == "cpu"
    assert cfg["rollout"]["dtype"] == cfg["teacher"]["dtype"] == cfg["eval"]["dtype"] == fast


def test_stage_peak_memory_reaches_mlflow(cpu_run):
    from mlflow.tracking import MlflowClient

    # a client of its own: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI to every
    # later run in this process
    client = MlflowClient(f"sqlite:///{Path(cpu_run['root']) / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    with_peak = [r for r in runs if "peak_memory_gib" in r.data.metrics]
    assert with_peak, "no stage run logged peak_memory_gib"
