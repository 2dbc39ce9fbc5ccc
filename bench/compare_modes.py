"""Offline vs online OPSD on the quickstart task: held-out compliance against wall time.

    python -m bench.compare_modes --root /path/to/opsd-home [--iterations 16]

Both runs use configs/quickstart.yaml on one storage root (shared stages are computed once):

* offline: the recipe as is — rollouts from the initial student, teacher targets once,
  2 epochs (64 optimiser steps of 16 samples);
* online: ``mode=online`` with the same model, data, sampling, teacher and optimiser settings
  and the same number of optimiser steps: every iteration samples ``prompts_per_iteration``
  train questions × n from the *current* student, scores them with the frozen teacher and
  takes ``steps_per_iteration`` steps; the held-out set is evaluated every ``eval_every``
  iterations.

Wall time counts what a user waits for, from the first stage after the dataset: the 'before'
and teacher evaluations, rollouts, teacher targets, training and the evaluations. For a stage
the offline run found already computed (e.g. by ``make demo``), the seconds of the run that
computed it are used (the catalog keeps them). Writes ``bench/results/modes.json``,
``docs/modes.png`` and the table in ``docs/modes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.docs import write_section

ROOT = Path(__file__).resolve().parent.parent


def _catalog(root: str):
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    layout = Layout.at(root)
    return Catalog(layout)


def computed_seconds(root: str, run_id: str) -> dict[str, float]:
    """label → seconds of the run that computed that stage's artifact (cached or not here)."""
    cat = _catalog(root)
    out = {}
    for s in cat.stages(run_id):
        _, rows = cat.query("SELECT seconds FROM stages WHERE key=? AND NOT cached AND status="
                            "'completed' ORDER BY started_at LIMIT 1", [s["key"]])
        out[s["label"]] = float(rows[0][0]) if rows else float(s["seconds"] or 0.0)
    return out


def run_offline(root: str, overrides: list[str]) -> dict:
    from opsd.flows.offline import offline_flow
    from opsd.config import load_config
    from opsd.flows.runner import new_run_id

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    run_id = f"{new_run_id()}-offline"
    metrics = offline_flow(config=cfg.model_dump(mode="json"), root=root, run_id=run_id,
                           show_progress=False)
    secs = computed_seconds(root, run_id)
    before_s = secs.get("evaluate/before", 0) + secs.get("evaluate/teacher", 0)
    total = sum(v for k, v in secs.items() if k != "dataset")
    curve = [{"label": "before", "wall_seconds": before_s, "greedy": metrics.get("eval.before.greedy")},
             {"label": "after", "wall_seconds": total, "greedy": metrics.get("eval.after.greedy")}]
    return {"mode": "offline", "run_id": run_id, "curve": curve, "stage_seconds": secs,
            "after": metrics.get("eval.after.greedy"), "teacher": metrics.get("eval.teacher.greedy"),
            "after_by_task": _by_task(metrics), "wall_s": total, "steps": _train_steps(root, run_id)}


def _train_steps(root: str, run_id: str) -> int | None:
    cat = _catalog(root)
    train = next((s for s in cat.stages(run_id) if s["label"] == "train"), None)
    return ((cat.artifact(train["key"]) or {}).get("manifest") or {}).get("steps") if train else None


def run_online(root: str, overrides: list[str]) -> dict:
    from opsd.flows.online import online_flow
    from opsd.config import load_config
    from opsd.flows.runner import new_run_id
    from opsd.storage.layout import Layout

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["mode=online", *overrides])
    run_id = f"{new_run_id()}-online"
    t0 = time.perf_counter()
    metrics = online_flow(config=cfg.model_dump(mode="json"), root=root, run_id=run_id,
                          show_progress=False)
    wall = time.perf_counter() - t0
    curve = json.loads((Layout.at(root).run_dir(run_id) / "curve.json").read_text())
    secs = computed_seconds(root, run_id)
    # the flow's clock starts before the 'before'/teacher evaluations: the same as offline's
    for c in curve:
        c["label"] = "before" if c["iteration"] < 0 else f"iteration {c['iteration'] + 1}"
    return {"mode": "online", "run_id": run_id, "curve": curve, "stage_seconds": secs,
            "after": metrics.get("eval.after.greedy"), "teacher": metrics.get("eval.teacher.greedy"),
            "after_by_task": _by_task(metrics), "wall_s": curve[-1]["wall_seconds"],
            "process_wall_s": wall,
            "steps": cfg.online.iterations * cfg.online.steps_per_iteration,
            "online": cfg.online.model_dump()}


def _by_task(metrics: dict) -> dict:
    return {k.rsplit(".", 1)[-1]: v for k, v in metrics.items() if k.startswith("eval.after.greedy.")}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, style in zip(results, ("o-", "s-")):
        xs = [c["wall_seconds"] / 60 for c in r["curve"] if c["greedy"] is not None]
        ys = [c["greedy"] * 100 for c in r["curve"] if c["greedy"] is not None]
        ax.plot(xs, ys, style, label=r["mode"])
    teacher = next((r["teacher"] for r in results if r.get("teacher") is not None), None)
    if teacher is not None:
        ax.axhline(teacher * 100, color="grey", ls="--", lw=1, label="teacher (with PI)")
    ax.set_xlabel("wall time (minutes, 2-core CPU)")
    ax.set_ylabel("held-out greedy compliance (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Quickstart: offline vs online OPSD (SmolLM2-135M)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['cpus']} CPU cores; command: `{meta['command']}`.",
             "", "![compliance vs wall time](modes.png)", "",
             "| mode | optimiser steps | compliance after | wall to result | time to ≥ 95 % |",
             "|---|---|---|---|---|"]
    for r in results:
        hit = next((c["wall_seconds"] for c in r["curve"]
                    if c["greedy"] is not None and c["greedy"] >= 0.95), None)
        steps = r.get("steps")
        lines.append(f"| {r['mode']} | {steps if steps else '-'} | **{r['after'] * 100:.1f}%** | "
                     f"{r['wall_s'] / 60:.1f} min | "
                     f"{'%.1f min' % (hit / 60) if hit is not None else 'not reached'} |")
    lines += ["", "Compliance per evaluation point:", "", "| mode | point | wall (min) | compliance |",
              "|---|---|---|---|"]
    for r in results:
        for c in r["curve"]:
            g = "-" if c["greedy"] is None else f"{c['greedy'] * 100:.1f}%"
            lines.append(f"| {r['mode']} | {c['label']} | {c['wall_seconds'] / 60:.1f} | {g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.environ.get("OPSD_HOME", "opsd-home"))
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--prompts-per-iteration", type=int, default=32)
    ap.add_argument("--steps-per-iteration", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra override for both modes (key=value)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "modes.json"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    online = [f"online.iterations={args.iterations}",
              f"online.prompts_per_iteration={args.prompts_per_iteration}",
              f"online.steps_per_iteration={args.steps_per_iteration}",
              f"online.eval_every={args.eval_every}"]
    results = [run_offline(args.root, args.overrides),
               run_online(args.root, [*online, *args.overrides])]
    import torch

    meta = {"date": datetime.now().strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "command": " ".join(["python -m bench.compare_modes", *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    text = markdown(results, meta)
    print(text)
    if not args.no_docs:
        plot(results, ROOT / "docs" / "modes.png")
        write_section(ROOT / "docs" / "modes.md", "modes:results", text, "Results")
        print(f"wrote docs/modes.md, docs/modes.png, {args.out}")


if __name__ == "__main__":
    main()
