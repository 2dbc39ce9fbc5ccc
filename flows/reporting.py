"""End-of-run report: headline metrics, the before/after table, summary plots."""

from __future__ import annotations

import logging

from opsd.flows.runner import Pipeline
from opsd.flows.steps import benchmark_metrics, headline_metrics
from opsd.stages.common import Artifact

log = logging.getLogger("opsd")


def compliance_table(evals: dict[str, Artifact]) -> str:
    """Plain-text table: one row per task, one column per evaluated policy (greedy pass %)."""
    order = [n for n in ("before", "after", "teacher") if n in evals] + [
        n for n in evals if n not in ("before", "after", "teacher")
    ]
    headers = {"before": "student before", "after": "student after", "teacher": "teacher (with PI)"}
    tasks = sorted({t for a in evals.values() for t in a.manifest.get("greedy", {})})
    cols = [headers.get(n, n) for n in order]
    width = max([len("task")] + [len(t) for t in tasks] + [len("mean over tasks")])
    lines = ["  ".join([f"{'task':<{width}}"] + [f"{c:>17}" for c in cols])]
    for t in tasks + ["mean over tasks"]:
        cells = []
        for n in order:
            m = evals[n].manifest
            v = m.get("greedy_macro") if t == "mean over tasks" else m.get("greedy", {}).get(t)
            cells.append(f"{v * 100:16.1f}%" if v is not None else f"{'-':>17}")
        lines.append("  ".join([f"{t:<{width}}"] + cells))
    return "\n".join(lines)


def benchmark_table(panels: dict[str, dict[str, Artifact]]) -> str:
    """Plain-text table: one row per benchmark, greedy pass % per evaluated policy and after − before."""
    names = [n for n in ("before", "after", "teacher") if n in panels]
    benches = list(dict.fromkeys(b for n in names for b in panels[n]))
    if not benches:
        return ""
    width = max(len("benchmark"), *(len(b) for b in benches))
    lines = ["  ".join([f"{'benchmark':<{width}}"] + [f"{n:>9}" for n in names] + [f"{'after-before':>13}"])]
    for b in benches:
        vals = {n: panels[n][b].manifest.get("greedy_macro") if b in panels[n] else None for n in names}
        cells = [f"{v * 100:8.1f}%" if v is not None else f"{'-':>9}" for v in vals.values()]
        delta = (f"{(vals['after'] - vals['before']) * 100:+12.1f}p"
                 if vals.get("after") is not None and vals.get("before") is not None else f"{'-':>13}")
        lines.append("  ".join([f"{b:<{width}}"] + cells + [delta]))
    return "\n".join(lines)


def finish_report(p: Pipeline, evals: dict[str, Artifact], *, rollouts: Artifact | None = None,
                  targets: Artifact | None = None, extra: dict[str, float] | None = None,
                  benchmarks: dict[str, dict[str, Artifact]] | None = None,
                  notes: list[str] | None = None) -> dict:
    """``benchmarks``: policy name → benchmark name → evaluate artifact (eval.benchmarks);
    ``notes``: sentences printed under the tables (e.g. that training ended still improving)."""
    from opsd.flows.plots import compliance_figure, log_position_gap

    metrics = headline_metrics(evals)
    metrics.update(benchmark_metrics(benchmarks or {}))
    metrics.update(extra or {})
    table = compliance_table(evals)
    panel = benchmark_table(benchmarks or {})
    if panel:
        table += "\n\nbenchmarks (held-out greedy pass rate)\n" + panel
    if notes:
        table += "\n\n" + "\n".join(notes)
    # one line in the run log (Prefect UI); the table itself is printed once, below
    p.say("held-out greedy compliance: " + ", ".join(
        f"{name} {metrics[f'eval.{name}.greedy']:.3f}" for name in evals
        if isinstance(metrics.get(f"eval.{name}.greedy"), float)))

    def log_summary(tracker, run_id):
        tracker.log_text(run_id, table + "\n", "compliance.txt")
        per_policy = {name: a.manifest.get("greedy", {}) for name, a in evals.items()}
        fig = compliance_figure(per_policy, f"{p.cfg.name}: held-out greedy pass rate")
        tracker.log_figure(run_id, fig, "plots/compliance.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        if rollouts is not None and targets is not None:
            log_position_gap(p, rollouts, targets, run_id)

    try:
        p.log_parent(log_summary)
    except Exception as err:  # a plot must not fail a finished run
        log.warning("summary plots skipped: %s", err)
    (p.layout.run_dir(p.run_id) / "compliance.txt").write_text(table + "\n")
    final = p.finish("completed", metrics)
    print(f"\nopsd run {p.run_id} finished in {final['wall_seconds']:.0f}s "
          f"({int(final['stages_run'])} stages ran, {int(final['stages_cached'])} reused)\n{table}\n")
    return final
