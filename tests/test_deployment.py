"""The project's prefect.yaml, served for real: a Prefect server, a process work pool, the
`quickstart-nightly` deployment registered by `prefect deploy` (with a 20-second interval and a
tiny recipe passed as parameters) and a worker. The schedule must trigger at least two pipeline
runs by itself, and the second must reuse every stage of the first (shown in the catalog).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from tests.helpers import free_port, wait_healthy
from tests.helpers import LABELS, tiny_config, write_dataset

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finished_runs(root: Path) -> list[dict]:
    layout = Layout.at(root)
    if not layout.catalog.exists():
        return []
    return [r for r in Catalog(layout).runs() if r["status"] == "completed"]


@pytest.mark.timeout(420)
def test_scheduled_deployment_runs_and_reuses_cached_stages(tiny_model_dir, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OPSD_PROJECT_DIR": str(REPO),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_WORKER_QUERY_SECONDS": "5", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "PYTHONPATH": str(REPO)}
    root = tmp_path / "home"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"))))
    procs = [_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                     str(port)], env, tmp_path / "server.log")]
    try:
        try:
            wait_healthy(api + "/health", procs[0], "prefect server")
        except AssertionError:
            raise AssertionError((tmp_path / "server.log").read_text()[-2000:]) from None
        run = lambda *a: subprocess.run([str(BIN / "prefect"), "--no-prompt", *a], env=env, cwd=REPO,  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
        res = run("work-pool", "create", "opsd", "--type", "process")
        assert res.returncode == 0, res.stdout + res.stderr
        params = {"config_path": str(recipe), "root": str(root), "overrides": []}
        res = run("deploy", "--name", "quickstart-nightly", "--params", json.dumps(params),
                  "--interval", "20")
        assert res.returncode == 0, res.stdout + res.stderr
        procs.append(_start([str(BIN / "prefect"), "worker", "start", "--pool", "opsd"], env,
                            tmp_path / "worker.log"))
        deadline = time.time() + 600
        while len(_finished_runs(root)) < 2:
            assert time.time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            assert procs[1].poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(3)
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    layout = Layout.at(root)
    cat = Catalog(layout)
    first, second = _finished_runs(root)[:2]
    computed = cat.stages(first["run_id"])
    assert [s["label"] for s in computed] == LABELS and not any(s["cached"] for s in computed)
    reused = cat.stages(second["run_id"])
    assert [s["label"] for s in reused] == LABELS and all(s["cached"] for s in reused)
    assert {s["key"] for s in reused} == {s["key"] for s in computed}
