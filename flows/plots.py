"""Plots and tables for MLflow and the artifact folders.

People read curves faster than numbers: every train stage gets a training
curve, every teacher stage a per-position teacher–student gap, every run a
before/after/teacher compliance chart; eval samples go to an MLflow table.
Plotting never fails a run: errors are logged and skipped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opsd.flows.runner import Pipeline
    from opsd.stages.common import Artifact

log = logging.getLogger("opsd")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curve_figure(history: dict[str, list]):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    panels = [("loss", "loss"), ("kl", "KL estimate (per token)"), ("entropy", "student entropy (nats)"),
              ("grad_norm", "grad norm (pre-clip)")]
    for ax, (col, title) in zip(axes.flat, panels):
        ax.plot(history["step"], history[col], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_training_curves(p: "Pipeline", art: "Artifact", stage_run: str | None) -> None:
    """Training curves of a train artifact as an MLflow plot (artifacts stay immutable)."""
    if not (p.tracker and stage_run):
        return
    try:
        from opsd.storage.parquet import read_table

        path = art.path / "metrics.parquet"
        if not path.exists():
            return
        history = read_table(path).to_pydict()
        if not history["step"]:
            return
        fig = training_curve_figure(history)
        p.tracker.log_figure(stage_run, fig, "plots/training_curves.png")
        _plt().close(fig)
    except Exception as err:  # plotting must never fail a run
        log.warning("training curve plot skipped: %s", err)


def log_eval_table(p: "Pipeline", art: "Artifact", stage_run: str | None) -> None:
    if not (p.tracker and stage_run):
        return
    try:
        from opsd.storage.parquet import read_table

        t = read_table(art.path).to_pydict()
        cols = {k: t[k] for k in ("row_id", "task", "greedy", "passed", "finish_reason", "text")}
        p.tracker.log_table(stage_run, cols, "eval_samples.json")
    except Exception as err:
        log.warning("eval table skipped: %s", err)


def compliance_figure(metrics: dict[str, dict[str, float]], title: str):
    """Grouped bars: one group per task, one bar per policy (before / after / teacher)."""
    plt = _plt()
    policies = list(metrics)
    tasks = sorted({t for m in metrics.values() for t in m})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    width = 0.8 / max(1, len(policies))
    for i, pol in enumerate(policies):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [metrics[pol].get(t, 0.0) * 100 for t in tasks], width, label=pol)
    ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=15)
    ax.set_ylabel("held-out greedy pass rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def position_gap_figure(positions: list[int], gap: list[float], counts: list[int]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(positions, gap, lw=1.3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("response position")
    ax.set_ylabel("mean log πT(y) − log πS(y)")
    ax.set_title("teacher − student log-prob of the sampled token, by position")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.fill_between(positions, counts, alpha=0.12, color="gray", step="mid")
    ax2.set_ylabel("tokens")
    fig.tight_layout()
    return fig


def log_position_gap(p: "Pipeline", rollouts: "Artifact", targets: "Artifact", stage_run: str | None):
    if not (p.tracker and stage_run):
        return
    try:
        import numpy as np

        from opsd.storage.parquet import read_table

        r = read_table(rollouts.path, columns=["sample_id", "behaviour_logprobs"]).to_pydict()
        t = read_table(targets.path, columns=["sample_id", "sampled_logprobs"]).to_pydict()
        beh = dict(zip(r["sample_id"], r["behaviour_logprobs"]))
        sums: dict[int, float] = {}
        cnt: dict[int, int] = {}
        for sid, tl in zip(t["sample_id"], t["sampled_logprobs"]):
            b = beh.get(sid)
            if b is None:
                continue
            for i, (a, c) in enumerate(zip(tl, b)):
                sums[i] = sums.get(i, 0.0) + (a - c)
                cnt[i] = cnt.get(i, 0) + 1
        pos = sorted(sums)
        fig = position_gap_figure(pos, [sums[i] / cnt[i] for i in pos], [cnt[i] for i in pos])
        p.tracker.log_figure(stage_run, fig, "plots/position_gap.png")
        _plt().close(fig)
        del np
    except Exception as err:
        log.warning("position gap plot skipped: %s", err)
