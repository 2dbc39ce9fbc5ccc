"""Browse a pipeline run in the real MLflow UI with headless Chromium (Debian `chromium`).

Starts `opsd ui` (an `mlflow server` on 127.0.0.1) over the store of a real
tiny pipeline run, then checks in the browser that the pipeline run, its
nested stage runs and the compliance plot are visible; screenshots are saved
next to the run (path printed) for people to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_healthy
from tests.helpers import LABELS, tiny_config, write_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed "
                                "(make test installs it with apt-get when it can)")


@pytest.mark.timeout(900)
def test_pipeline_run_nested_stages_and_plot_visible_in_mlflow_ui(tiny_model_dir, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    from opsd.flows.offline import offline_flow

    root = tmp_path / "home"
    data = write_dataset(tmp_path / "data.jsonl")
    offline_flow(config=tiny_config(tiny_model_dir, data), root=str(root), show_progress=False)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, "-m", "opsd.cli", "ui", "--root", str(root),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base + "/health", server, "mlflow server")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(base)
        exp = client.get_experiment_by_name("opsd")
        parent = next(r for r in client.search_runs([exp.experiment_id])
                      if "mlflow.parentRunId" not in r.data.tags)
        shots = tmp_path / "screenshots"
        shots.mkdir()
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs", timeout=120_000)
            page.wait_for_selector(f"text={parent.info.run_name[:12]}", timeout=90_000)
            # expand the pipeline run to show its nested stage runs
            page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            page.wait_for_selector("text=evaluate/after", timeout=60_000)
            for label in LABELS:
                assert page.locator(f"text={label}").count() >= 1, label
            page.screenshot(path=str(shots / "runs.png"))
            page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts"
                      "/plots/compliance.png", timeout=120_000)
            # the artifact viewer fetches the file and shows it from a blob: URL
            img = page.locator("img[src^='blob:']").first
            img.wait_for(state="visible", timeout=90_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll(\"img[src^='blob:']\")]"
                ".some(e => e.naturalWidth > 100)", timeout=60_000)
            page.screenshot(path=str(shots / "compliance.png"))
            browser.close()
        print(f"screenshots: {shots}")
        assert (shots / "runs.png").stat().st_size > 10_000
    finally:
        os.killpg(server.pid, 9)
        server.wait()
