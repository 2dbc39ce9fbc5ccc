"""The ``opsd`` command line.

    opsd run CONFIG [--data PATH] [--set key=value ...]   run a pipeline (Prefect flow)
    opsd stage NAME --run RUN_ID [--force] [--set ...]   rerun one stage (and what depends on it)
    opsd runs [--json]                                   runs with status and headline metrics
    opsd runs --compare RUN RUN ...                      recipes side by side (MLflow's metric names)
    opsd artifacts [--run RUN_ID]                        artifacts in the catalog
    opsd query "SELECT ..."                              SQL over the catalog and Parquet views
    opsd verify [--run RUN_ID]                           check artifacts against their hashes
    opsd track --run RUN_ID                              log to MLflow what a run's tracking missed
    opsd ui [--run RUN_ID]                               MLflow UI on 127.0.0.1: the runs table (or a run)
    opsd config fields                                   every config key with its help text
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from opsd.env import apply_defaults

apply_defaults()  # before Prefect is imported anywhere

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="On-policy self-distillation pipelines: rollouts → privileged teacher → distil → evaluate.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configuration recipes.", no_args_is_help=True)
app.add_typer(config_app, name="config")

RootOpt = typer.Option(None, "--root", help="Artifact root (default: $OPSD_HOME or ./opsd-home).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: key.path=value (repeatable).")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _catalog(root: Optional[Path]):
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout, resolve_root

    r = resolve_root(root)
    if not (r / "catalog.duckdb").exists():
        _fail(f"no catalog at {r}; run a pipeline first (opsd run CONFIG) or pass --root")
    return Catalog(Layout.at(r))


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML recipe, e.g. configs/quickstart.yaml."),
    data: Optional[str] = typer.Option(None, "--data", help="Use this dataset instead of the recipe's."),
    set_: Optional[List[str]] = SetOpt,
    root: Optional[Path] = RootOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Resume/reuse this run id."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Run a pipeline from a recipe. Completed stages with the same key are reused."""
    from opsd.config import ConfigError, load_config
    from opsd.flows.errors import user_errors

    with user_errors():
        try:
            cfg = load_config(config, set_ or [], data)
        except ConfigError as err:
            _fail(str(err))
        from opsd.flows.pipeline import run_config
        from opsd.flows.services import run_then_settle
        from opsd.flows.steps import check_inputs
        from opsd.storage.layout import check_root, check_run_id

        if run_id is not None:
            check_run_id(run_id)  # it names a folder: no paths in it
        check_root(root)  # a file or a read-only folder is refused before anything is written
        check_inputs(cfg)  # bad data or models are refused before Prefect starts
        run_then_settle(lambda: run_config(cfg, root=str(root) if root else None, run_id=run_id,
                                           show_progress=progress), str(root) if root else None)


@app.command()
def stage(
    name: str = typer.Argument(..., help="dataset | rollout | teacher | train | evaluate"),
    run_id: str = typer.Option(..., "--run", help="The run whose config and artifacts to start from."),
    force: bool = typer.Option(False, "--force", help="Recompute even if an identical artifact exists."),
    set_: Optional[List[str]] = SetOpt,
    root: Optional[Path] = RootOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Rerun one stage of an existing run (plus the stages that depend on it).

    Upstream stages are taken from the catalog (they must exist); the result is a
    new run whose parent is --run, so the original stays as it was.
    """
    from opsd.flows.errors import user_errors
    from opsd.flows.stage_flows import RunNotFound, rerun
    from opsd.flows.steps import STAGE_ORDER

    if name not in STAGE_ORDER:
        _fail(f"unknown stage {name!r}; choose one of {', '.join(STAGE_ORDER)}")
    _catalog(root)  # refuse a root without a catalog before Prefect starts
    from opsd.flows.services import run_then_settle
    from opsd.storage.layout import check_root

    with user_errors():
        check_root(root)  # a read-only root is refused before anything is written
        try:
            run_then_settle(lambda: rerun(name, run_id, force, set_ or [],
                                          str(root) if root else None, progress),
                            str(root) if root else None)
        except RunNotFound as err:
            _fail(str(err))


@app.command()
def runs(
    run_ids: Optional[List[str]] = typer.Argument(
        None, help="With --compare: the runs to compare (opsd or MLflow run ids; prefixes work)."),
    compare: bool = typer.Option(
        False, "--compare", help="Side by side: recipe, objective, before/after/teacher per task, "
        "retention, wall time, under the metric names MLflow shows."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    root: Optional[Path] = RootOpt,
):
    """Pipeline runs with status and headline metrics; --compare RUN RUN ... side by side."""
    cat = _catalog(root)
    if compare:
        _compare_runs(cat, run_ids or [], as_json)
        return
    if run_ids:
        _fail("run ids are taken only with --compare (opsd runs --compare RUN RUN ...)")
    items = cat.runs()
    if as_json:
        out = [
            {"run_id": r["run_id"], "name": r["name"], "mode": r["mode"], "status": r["status"],
             "created_at": str(r["created_at"]), "finished_at": str(r["finished_at"] or ""),
             "parent_run_id": r["parent_run_id"], "mlflow_run_id": r["mlflow_run_id"],
             "metrics": r["metrics"], "error": r["error"]}
            for r in items
        ]
        typer.echo(json.dumps(out, indent=2))
        return
    if not items:
        typer.echo("no runs yet")
        return
    typer.echo(f"{'run_id':<22} {'name':<16} {'mode':<8} {'status':<10} {'before':>7} {'after':>7} {'teacher':>8}  wall")
    for r in items:
        m = r["metrics"]

        def pct(k):
            return f"{m[k] * 100:6.1f}%" if k in m else f"{'-':>7}"

        wall = f"{m['wall_seconds']:.0f}s" if "wall_seconds" in m else "-"
        typer.echo(f"{r['run_id']:<22} {r['name'][:16]:<16} {r['mode']:<8} {r['status']:<10} "
                   f"{pct('eval.before.greedy')} {pct('eval.after.greedy')} {pct('eval.teacher.greedy'):>8}  {wall}")



def _find_run(cat, run_id: str) -> dict:
    """A catalog run by opsd run id (or unique prefix) or by its MLflow run id."""
    try:
        found = cat.run(run_id)
    except ValueError as err:  # an ambiguous prefix
        _fail(str(err))
    found = found or next((r for r in cat.runs() if r["mlflow_run_id"] == run_id), None)
    if found is None:
        _fail(f"no run {run_id!r} in the catalog (opsd runs lists them)")
    return found


def _compare_runs(cat, run_ids: List[str], as_json: bool) -> None:
    """Print runs side by side: one column per run, one row per recipe field or metric.

    Metric rows are the headline metrics any of the runs has, named as in MLflow
    (``storage.tracking.metric_name``), in the order of the MLflow runs view.
    """
    from opsd.storage.tracking import headline_keys, metric_name, recipe_tags

    if len(run_ids) < 2:
        _fail("--compare takes two or more run ids: opsd runs --compare RUN RUN ...")
    found = [_find_run(cat, rid) for rid in run_ids]
    metrics = [{metric_name(k): v for k, v in r["metrics"].items()} for r in found]
    keys = headline_keys(set().union(*metrics))
    fields = [{"run_id": r["run_id"], **recipe_tags(r["config"]), "mode": r["mode"],
               "status": r["status"], "mlflow_run_id": r["mlflow_run_id"]} for r in found]
    if as_json:
        out = [{**f, "metrics": {k: m[k] for k in keys if k in m}} for f, m in zip(fields, metrics)]
        typer.echo(json.dumps(out, indent=2))
        return

    def number(key: str, v) -> str:
        return "-" if v is None else f"{v:.1f}" if key == "wall_seconds" else f"{v:.3f}"

    rows = [(name, [str(f[name] or "-") for f in fields])
            for name in ("run_id", "opsd.recipe", "opsd.objective", "mode", "status")]
    rows += [(k, [number(k, m.get(k)) for m in metrics]) for k in keys]
    label_w = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(found))]
    for name, cells in rows:
        typer.echo("  ".join([name.ljust(label_w)] + [c.rjust(w) for c, w in zip(cells, widths)]))


@app.command()
def artifacts(
    run_id: Optional[str] = typer.Option(None, "--run", help="Only the stages of this run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    root: Optional[Path] = RootOpt,
):
    """Artifacts in the catalog (or the stages of one run)."""
    cat = _catalog(root)
    if run_id:
        run_rec = cat.run(run_id)
        if run_rec is None:
            _fail(f"no run {run_id!r}")
        cols, rows = cat.query(
            "SELECT s.label, s.status, s.cached, round(s.seconds, 1) AS seconds, s.key, a.path, "
            "a.rows, a.bytes FROM stages s LEFT JOIN artifacts a USING (key) WHERE s.run_id = ? "
            "ORDER BY s.started_at", [run_rec["run_id"]])
    else:
        cols, rows = cat.query(
            "SELECT stage, key, rows, bytes, status, created_at, producer_run_id, path FROM artifacts "
            "ORDER BY created_at")
    _print_rows(cols, rows, as_json)


@app.command()
def query(
    sql: str = typer.Argument(..., help="SQL over tables runs/stages/artifacts and views "
                              "rollouts/teacher_targets/teacher_tokens/eval_samples/train_metrics."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | csv"),
    root: Optional[Path] = RootOpt,
):
    """Ask SQL questions of the catalog and the Parquet artifacts (read-only snapshot)."""
    import duckdb

    cat = _catalog(root)
    try:
        cols, rows = cat.query(sql)
    except duckdb.Error as err:
        views = ", ".join(cat.views()) or "none yet"
        _fail(f"{err}\n(tables: runs, stages, artifacts; views: {views})")
    _print_rows(cols, rows, fmt == "json", csv=fmt == "csv")


def _print_rows(cols, rows, as_json: bool, csv: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps([dict(zip(cols, r)) for r in rows], indent=2, default=str))
        return
    if csv:
        import csv as _csv

        w = _csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
        return

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        s = str(v)
        return s if len(s) <= 60 else s[:57] + "..."

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    typer.echo(f"({len(rows)} rows)")


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port for the MLflow UI."),
    host: str = typer.Option("127.0.0.1", help="Bind address (default loopback only)."),
    run_id: Optional[str] = typer.Option(
        None, "--run", help="Print this run's page (opsd or MLflow run id) instead of the runs table."),
    root: Optional[Path] = RootOpt,
):
    """Serve the MLflow UI over this root's runs until Ctrl-C or SIGTERM.

    Prints the opsd experiment's runs table (model-training view; recipe, objective and headline
    metrics as columns), or with --run that run's page, once the server answers. Stopping
    `opsd ui` stops the MLflow server and every process it started.
    """
    from opsd.storage.layout import Layout
    from opsd.storage.mlflow_ui import (OwnedServer, browse_host, port_in_use, run_url, runs_url,
                                        server_command, server_env)
    from opsd.storage.tracking import Tracker

    layout = Layout.at(root)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host} exposes runs to the network", fg="yellow", err=True)
    if port_in_use(host, port):  # its /health would answer and the URL would show another store
        _fail(f"port {port} is already in use on {browse_host(host)}: stop that server or pass --port")
    tracker = Tracker(layout.mlflow_db, layout.mlflow_artifacts)  # creates the experiment if new
    tracker.publish_runs_view()
    base = f"http://{browse_host(host)}:{port}"
    if run_id is None:
        url = runs_url(base, tracker.experiment_id)
    else:
        url = run_url(base, *_mlflow_run(tracker, root, run_id))
    cmd = server_command(tracker.uri, layout.mlflow_artifacts.resolve().as_uri(), host, port)
    with OwnedServer(cmd, server_env(), f"{base}/health") as server:
        try:
            server.wait_ready()
        except RuntimeError as err:
            _fail(str(err), code=1)
        typer.echo(f"MLflow UI: {url}  (Ctrl-C to stop)")
        raise typer.Exit(server.wait())  # the server ended by itself
    typer.echo("MLflow UI stopped")


def _mlflow_run(tracker, root: Optional[Path], run_id: str) -> tuple[str, str]:
    """(experiment id, MLflow run id) of an opsd run id (or prefix) or of an MLflow run id."""
    from opsd.storage.layout import resolve_root

    if (resolve_root(root) / "catalog.duckdb").exists():
        found = _catalog(root).run(run_id)
        if found and found["mlflow_run_id"]:
            run_id = found["mlflow_run_id"]
    try:
        run = tracker.client.get_run(run_id)
    except Exception:
        _fail(f"no run {run_id!r} in the catalog or the MLflow store (opsd runs lists them)")
    return run.info.experiment_id, run.info.run_id


@app.command()
def verify(
    run_id: Optional[str] = typer.Option(None, "--run", help="Only the artifacts of this run's stages."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    root: Optional[Path] = RootOpt,
):
    """Check artifacts against the hashes recorded when they were published.

    Every complete artifact's files are compared with their catalogued sizes and SHA-256; folders
    under artifacts/ that the catalog does not know are listed as orphans. Exit code 0: all
    intact; 1: damaged or orphaned artifacts (listed); 2: no catalog or no such run.
    """
    from opsd.storage.integrity import verify_root
    from opsd.storage.layout import Layout, resolve_root

    cat = _catalog(root)
    rid = None
    if run_id:
        try:
            rec = cat.run(run_id)
        except ValueError as err:
            _fail(str(err))
        if rec is None:
            _fail(f"no run {run_id!r} in the catalog at {resolve_root(root)}; see `opsd runs`")
        rid = rec["run_id"]
    report = verify_root(Layout.at(resolve_root(root)), rid)
    if as_json:
        typer.echo(json.dumps({
            "ok": report.ok, "checked": report.checked, "bytes": report.nbytes,
            "seconds": round(report.seconds, 3),
            "damaged": [{"key": d.key, "path": str(d.path), "problem": d.problem}
                        for d in report.damaged],
            "orphans": [str(p) for p in report.orphans],
            "unfinished": [{"path": str(p), "status": s} for p, s in report.unfinished],
        }, indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
        verdict = "all intact" if report.ok else (
            f"{len(report.damaged)} damaged file(s), {len(report.orphans)} orphan folder(s)")
        typer.echo(f"{report.checked} artifacts ({report.nbytes} bytes) checked in "
                   f"{report.seconds:.2f}s: {verdict}")
        if report.damaged:
            typer.echo("A damaged artifact is never reused: the next run that needs it recomputes "
                       "it (`opsd run RECIPE`, or `opsd stage STAGE --run RUN_ID`).")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def track(
    run_id: str = typer.Option(..., "--run", help="The run whose MLflow records to complete."),
    root: Optional[Path] = RootOpt,
):
    """Log to MLflow what a run's tracking missed (the MLflow store failed during the run).

    Reads the run, its stages and their manifests from the catalog; stages MLflow already has
    are left alone, so running it twice logs nothing twice.
    """
    from opsd.flows.track import catch_up
    from opsd.storage.layout import Layout, resolve_root

    cat = _catalog(root)
    try:
        rec = cat.run(run_id)
    except ValueError as err:
        _fail(str(err))
    if rec is None:
        _fail(f"no run {run_id!r} in the catalog at {resolve_root(root)}; see `opsd runs`")
    try:
        done = catch_up(Layout.at(resolve_root(root)), rec["run_id"])
    except Exception as err:  # noqa: BLE001 - the store still failing: say so, keep the mark
        _fail(f"MLflow still fails for run {rec['run_id']} ({type(err).__name__}: {err}); "
              "fix the tracking store (MLFLOW_TRACKING_URI or <root>/mlflow.db) and retry", 1)
    typer.echo(f"run {done.run_id}: MLflow run {done.mlflow_run_id} "
               f"({'created' if done.parent_created else 'existing'}); "
               f"{len(done.stages_logged)} stage(s) logged, {len(done.stages_present)} already there")


@config_app.command("fields")
def config_fields():
    """Every config key with its type, default and help text."""
    from opsd.config import describe_fields

    for key, typ, default, help_ in describe_fields():
        typer.echo(f"{key:<34} {typ:<10} {json.dumps(default, default=str):<24} {help_}")


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="YAML recipe."),
    set_: Optional[List[str]] = SetOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Dataset override."),
):
    """The fully resolved config (defaults + recipe + overrides) as YAML."""
    import yaml

    from opsd.config import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [], data)
    except ConfigError as err:
        _fail(str(err))
    typer.echo(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))


@app.command("prepare-model")
def prepare_model(name: str = typer.Argument("smollm2-135m-instruct", help="Built-in model name.")):
    """Convert a built-in model once into the local cache and print its folder."""
    from opsd.flows.errors import user_errors
    from opsd.models import resolve_model_path

    with user_errors():
        typer.echo(str(resolve_model_path(name)))


if __name__ == "__main__":
    app()
