"""Browsing runs the way users expect: `opsd ui`, `opsd ui --run`, `opsd runs --compare`.

Two recipes (forward_kl_topk and reverse_kl_sampled) run as real Prefect flows of the tiny
pipeline on the same data into one OPSD home (real DuckDB catalog, real MLflow SQLite store).

- `opsd runs --compare` prints them side by side under the metric names and tags MLflow holds.
- `opsd ui` prints the runs-table URL; headless Chromium (Debian's `chromium`, a fresh profile
  at 1920×1080, so MLflow's assistant panel opens beside the table as it does for a new user)
  must show on its first screen the model-training runs table with both runs, their recipe,
  objective, before/after/teacher and wall-time columns and values; the pipeline run expands to
  its stage runs and its compliance plot renders. `opsd ui --run ID` prints the run's page.
- SIGTERM and Ctrl-C (SIGINT) stop the server and every process it started, also MLflow's job
  workers when a user turns them on; by default none are started.

Screenshots are kept in the session's pytest base folder (path printed) for people to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from opsd.cli import app
from tests.helpers import LABELS, free_port, tiny_config, write_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (`make test` installs it with "
    "apt-get when run as root; `apt-get install chromium` does it by hand)")
REPO = Path(__file__).resolve().parent.parent
VIEWPORT = {"width": 1920, "height": 1080}
HEADLINE = ["opsd.recipe", "opsd.objective", "eval.before.greedy", "eval.after.greedy",
            "eval.teacher.greedy", "wall_seconds"]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_recipes(tiny_model_dir, tmp_path_factory):
    """Two recipes on the same data in one home: {"root", "runs": [catalog run, ...]}."""
    from opsd.flows.offline import offline_flow
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    base = tmp_path_factory.mktemp("recipes")
    data = write_dataset(base / "data.jsonl")
    root = base / "home"
    cfg = tiny_config(tiny_model_dir, data)
    offline_flow(config=cfg, root=str(root), show_progress=False)
    rkl = {**cfg, "name": "tiny-rkl", "train": {**cfg["train"], "objective": "reverse_kl_sampled"}}
    offline_flow(config=rkl, root=str(root), show_progress=False)
    runs = Catalog(Layout.at(root)).runs()
    assert [r["status"] for r in runs] == ["completed", "completed"]
    # outside the run folder, which is removed (small CI disks)
    shots = tmp_path_factory.getbasetemp() / "mlflow-ui-screenshots"
    shots.mkdir(exist_ok=True)
    yield {"root": root, "runs": runs, "shots": shots}
    shutil.rmtree(base, ignore_errors=True)


def _mlflow(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")


@contextmanager
def opsd_ui(root: Path, *args: str, env: dict | None = None):
    """Run `opsd ui --root ROOT` until the block ends; yields (process, printed URL, log path).

    Output goes to a file, not a pipe: the server's own log would fill an unread pipe.
    """
    log = root.parent / f"opsd-ui-{time.monotonic_ns()}.log"
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsd.cli", "ui", "--root", str(root), "--port", str(port), *args],
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        yield proc, _wait_url(proc, log), log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _wait_url(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"^MLflow UI: (\S+)", log.read_text(), re.M)
        if found:
            return found.group(1)
        assert proc.poll() is None, f"opsd ui exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"opsd ui printed no URL in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def chromium_page():
    pw = pytest.importorskip("playwright.sync_api")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic"])
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def _on_first_screen(locator) -> bool:
    """Visible, inside the viewport without scrolling, and not covered (by the assistant panel,
    or clipped by the grid's own scroll area): what is drawn at its centre is the element."""
    if not locator.is_visible():
        return False
    box = locator.bounding_box()
    inside = (box is not None and box["x"] >= 0 and box["y"] >= 0
              and box["x"] + box["width"] <= VIEWPORT["width"] + 1
              and box["y"] + box["height"] <= VIEWPORT["height"] + 1)
    return inside and locator.evaluate(
        "e => { const r = e.getBoundingClientRect();"
        " const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);"
        " return !!hit && (e.contains(hit) || hit.contains(e)); }")


# ----------------------------------------------------------------------- opsd runs --compare


@pytest.mark.timeout(420)
def test_compare_prints_recipes_side_by_side_with_mlflow_names(two_recipes):
    a, b = two_recipes["runs"]
    root = two_recipes["root"]
    out = CliRunner().invoke(app, ["runs", "--root", str(root), "--compare", a["run_id"], b["run_id"]])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line.split()[1:] for line in out.output.splitlines() if line.strip()}
    print(out.output)
    assert rows["run_id"] == [a["run_id"], b["run_id"]]
    assert rows["opsd.objective"] == ["forward_kl_topk", "reverse_kl_sampled"]
    assert rows["opsd.recipe"] == ["tiny", "tiny-rkl"]

    client = _mlflow(root)
    mlflow_runs = [client.get_run(r["mlflow_run_id"]) for r in (a, b)]
    metric_rows = [k for k in rows if k.startswith(("eval.", "retention.")) or k == "wall_seconds"]
    # the headline set: macro and per task (tasks 'other' and 'sure'), wall time
    assert metric_rows[:4] == HEADLINE[2:]
    assert {"eval.after.greedy.sure", "eval.teacher.greedy.other"} <= set(metric_rows)
    for mr in mlflow_runs:  # the same names and the same recipe tags in MLflow
        assert set(metric_rows) <= set(mr.data.metrics)
    for i, mr in enumerate(mlflow_runs):
        assert rows["opsd.recipe"][i] == mr.data.tags["opsd.recipe"]
        assert rows["opsd.objective"][i] == mr.data.tags["opsd.objective"]
        assert float(rows["wall_seconds"][i]) == pytest.approx(mr.data.metrics["wall_seconds"], abs=0.06)

    # --json: the values themselves, equal to MLflow's; MLflow run ids work as well
    out = CliRunner().invoke(app, ["runs", "--root", str(root), "--compare", "--json",
                                   a["mlflow_run_id"], b["run_id"][:15]])
    assert out.exit_code == 0, out.output
    for item, mr in zip(json.loads(out.output), mlflow_runs):
        assert item["metrics"] == {k: mr.data.metrics[k] for k in item["metrics"]}
        assert list(item["metrics"]) == metric_rows

    # the MLflow runs view shows the same set as columns
    exp = client.get_experiment_by_name("opsd")
    view = json.loads(exp.tags["mlflow.sharedViewState.opsd-runs"])
    assert view["selectedColumns"] == [f"tags.`{k}`" for k in HEADLINE[:2]] + [
        f"metrics.`{k}`" for k in metric_rows]

    bad = CliRunner().invoke(app, ["runs", "--root", str(root), "--compare", a["run_id"]])
    assert bad.exit_code == 2 and "two or more" in bad.output


# ----------------------------------------------------------------------- opsd ui in a browser


@needs_chromium
@pytest.mark.timeout(420)
def test_opsd_ui_lands_on_the_runs_table_with_headline_columns(two_recipes):
    root = two_recipes["root"]
    client = _mlflow(root)
    parents = [client.get_run(r["mlflow_run_id"]) for r in two_recipes["runs"]]
    shots = two_recipes["shots"]
    with opsd_ui(root) as (_, url, _log), chromium_page() as page:
        assert "/#/experiments/" in url and url.split("/#/")[0].startswith("http://127.0.0.1:")
        page.goto(url, timeout=120_000)
        for run in parents:
            page.wait_for_selector(f"text={run.info.run_name[:12]}", timeout=90_000)
        page.wait_for_selector("text=eval.teacher.greedy", timeout=60_000)
        page.wait_for_timeout(1500)  # let the grid settle its column widths
        page.screenshot(path=str(shots / "landing.png"))
        # the model-training runs table, not MLflow's GenAI overview
        assert page.get_by_text("Observability", exact=True).count() == 0
        assert page.get_by_text("Evaluation runs", exact=True).count() == 0
        for name in HEADLINE:  # column headers on the first screen
            header = page.get_by_role("columnheader", name=name, exact=True).first
            assert _on_first_screen(header), f"column {name} not on the first screen"
        for objective in ("forward_kl_topk", "reverse_kl_sampled"):
            cell = page.get_by_role("gridcell", name=objective, exact=True).first
            assert _on_first_screen(cell), objective
        for run in parents:  # each run's values on the first screen (wall time is distinct)
            wall = page.locator(f".ag-cell:has-text('{str(run.data.metrics['wall_seconds'])[:6]}')")
            assert _on_first_screen(wall.first), run.info.run_name

        # the pipeline run expands to its nested stage runs
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.wait_for_selector("text=evaluate/after", timeout=60_000)
        for label in LABELS:
            assert page.locator(f"text={label}").count() >= 1, label
        page.screenshot(path=str(shots / "runs.png"))

        # and its compliance plot renders (the artifact viewer shows it from a blob: URL)
        base = url.split("/#/")[0]
        parent = parents[0]
        page.goto(f"{base}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
                  "/artifacts/plots/compliance.png", timeout=120_000)
        page.locator("img[src^='blob:']").first.wait_for(state="visible", timeout=90_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll(\"img[src^='blob:']\")]"
            ".some(e => e.naturalWidth > 100)", timeout=60_000)
        page.screenshot(path=str(shots / "compliance.png"))
    print(f"screenshots: {shots}")
    assert (shots / "landing.png").stat().st_size > 10_000


@needs_chromium
@pytest.mark.timeout(420)
def test_opsd_ui_run_prints_that_runs_page(two_recipes):
    root = two_recipes["root"]
    run = two_recipes["runs"][1]
    parent = _mlflow(root).get_run(run["mlflow_run_id"])
    shots = two_recipes["shots"]
    with opsd_ui(root, "--run", run["run_id"]) as (_, url, _log), chromium_page() as page:
        assert url.split("?")[0].endswith(f"/runs/{run['mlflow_run_id']}")
        page.goto(url, timeout=120_000)
        page.get_by_role("heading", name=parent.info.run_name).wait_for(timeout=90_000)
        page.wait_for_selector("text=Child runs", timeout=60_000)
        for label in LABELS:  # its stage runs, linked from the overview
            assert page.get_by_role("link", name=label, exact=True).count() >= 1, label
        # under the experiment's runs, not the GenAI "Evaluations" breadcrumb
        assert page.get_by_text("Evaluations", exact=True).count() == 0
        assert page.get_by_role("link", name="Runs", exact=True).count() >= 1
        assert page.get_by_text("reverse_kl_sampled").count() >= 1  # the objective tag
        page.screenshot(path=str(shots / "run.png"))
    print(f"screenshots: {shots}")


# ---------------------------------------------------------------------- stopping `opsd ui`


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _port_open(url: str) -> bool:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _stop_and_check(proc: subprocess.Popen, tree: list[psutil.Process], url: str, signum: int,
                    log: Path) -> float:
    """Send ``signum`` to `opsd ui` alone; it must exit 0 and leave no process and no listener."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 10  # orphans are reaped by their new parent
    while not all(_gone(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in tree if not _gone(p)]
    assert not left, "left running:\n" + "\n".join(left)
    assert not _port_open(url)
    assert "MLflow UI stopped" in log.read_text()
    return seconds


@pytest.mark.timeout(300)
def test_sigterm_stops_the_server_and_no_job_workers_start(tmp_path):
    root = tmp_path / "home"  # an empty home: `opsd ui` creates the experiment
    with opsd_ui(root) as (proc, url, log):
        tree = _tree(proc.pid)
        cmdlines = [" ".join(p.cmdline()) for p in tree]
        print("\n".join(c[:120] for c in cmdlines))
        assert any("mlflow server" in c for c in cmdlines)
        assert not [c for c in cmdlines if "huey" in c or "_job_runner" in c]
        assert len(tree) <= 2  # the launcher and its uvicorn process
        seconds = _stop_and_check(proc, tree, url, signal.SIGTERM, log)
    print(f"stopped {len(tree)} processes in {seconds:.1f} s")


@pytest.mark.timeout(300)
def test_ctrl_c_stops_mlflow_job_workers_a_user_turned_on(tmp_path):
    root = tmp_path / "home"
    with opsd_ui(root, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}) as (proc, url, log):
        deadline = time.monotonic() + 120
        while not any("huey" in " ".join(p.cmdline()) for p in _tree(proc.pid)):
            assert time.monotonic() < deadline, "MLflow's job workers never started"
            time.sleep(1)
        time.sleep(3)  # the rest of the consumers
        tree = _tree(proc.pid)
        workers = [p for p in tree if "huey" in " ".join(p.cmdline())]
        seconds = _stop_and_check(proc, tree, url, signal.SIGINT, log)
    print(f"stopped {len(tree)} processes ({len(workers)} huey consumers) in {seconds:.1f} s")
    assert workers


def test_busy_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = CliRunner().invoke(app, ["ui", "--root", str(tmp_path / "home"), "--port", str(port)])
    assert out.exit_code == 2 and "already in use" in out.output
    assert not (tmp_path / "home" / "mlflow.db").exists()  # refused before touching the store
