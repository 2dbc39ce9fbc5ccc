"""Run every recipe in configs/ end to end on the quickstart task and compare them.

    python -m bench.compare_recipes --root /path/to/opsd-home            # all recipes
    python -m bench.compare_recipes --recipes quickstart srpo --set train.steps=32
    python -m bench.compare_recipes --merge --recipes online/opsd online/kepo --set online.iterations=8
    python -m bench.compare_recipes --recipes facts/opsd --seeds 0 1 2 --no-docs

A recipe is a config path under configs/ without ``.yaml`` (``online/sdpo`` is
``configs/online/sdpo.yaml``); each runs through the flow of its ``mode`` (offline or online).
All runs share one storage root, so the upstream stages (dataset, base and teacher
evaluations, rollouts, teacher targets, retention base replies) are computed by the first
recipe that needs them and reused by the others — content keys decide, not this script.
Recipes run one after another in this process (the offline Prefect flow); a failing recipe
is recorded and the next one runs.

For each recipe: held-out greedy compliance (verifier pass rate, macro over tasks) of the
student before and after training and of the teacher with its privileged context, per-task
compliance after training, retention (mean log-likelihood delta and greedy exact match of the
base model's replies to rule-free prompts), wall time of the run (the first run pays for the
shared stages), train-stage seconds and response tokens trained. Prints a table, writes JSON
(``bench/results/recipes.json``) and rewrites the results section of ``docs/recipes.md``
between its markers (``--no-docs`` to skip).

``--seeds S ...`` runs every recipe once per seed (``train.seed=S``: the batch order and LoRA's
initial adapters; in offline mode the rollouts and teacher targets are shared, so only training
and the after-evaluations run again) and adds a table of each recipe's mean, standard deviation and range
over its seeds. One seed can move a 48-question pass rate by several questions
(docs/quality.md), so a recipe is compared by its mean over seeds, not by one draw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.docs import write_section  # noqa: E402

RECIPES = ["quickstart", "lightning-opd", "opsd", "pw-opsd", "tip", "srpo", "scope", "exopd",
           "vopd", "trace", "mopd", "caopd", "grpo", "sft"]
ONLINE_RECIPES = ["online/opsd", "online/sdpo", "online/skill-sd", "online/sd-zero", "online/brts",
                  "online/cepo", "online/kepo", "online/avsd", "online/atesd"]


def run_recipe(name: str, root: str, overrides: list[str], tag: str = "") -> dict:
    from opsd.flows.pipeline import FLOWS
    from opsd.config import load_config
    from opsd.flows.runner import new_run_id
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    run_id = f"{new_run_id()}-{name.replace('/', '-')}"
    t0 = time.perf_counter()
    metrics = FLOWS[cfg.mode](config=cfg.model_dump(mode="json"), root=root, run_id=run_id,
                              show_progress=False)
    wall = time.perf_counter() - t0
    layout = Layout.at(root)
    cat = Catalog(layout)
    stages = cat.stages(run_id)
    # compute time of every stage the recipe needs, as measured by the run that computed it
    # (stages shared with an earlier recipe count for each recipe: the cost from scratch)
    compute_s = 0.0
    for s in stages:
        if s["label"] == "dataset":
            continue
        _, rows = cat.query("SELECT seconds FROM stages WHERE key=? AND NOT cached AND "
                            "status='completed' ORDER BY started_at LIMIT 1", [s["key"]])
        compute_s += float(rows[0][0]) if rows else float(s["seconds"] or 0.0)
    # offline: one `train` stage; online: `train/000`, `train/001`, ... (summed)
    mans = [(cat.artifact(s["key"]) or {}).get("manifest", {}) for s in stages
            if s["label"] == "train" or s["label"].startswith("train/")]
    man = mans[-1] if mans else {}

    def total(field: str):
        vals = [m[field] for m in mans if isinstance(m.get(field), (int, float))]
        return sum(vals) if vals else None
    def by_task(prefix: str) -> dict[str, float]:
        """``{task: value}`` of the metrics named ``<prefix><task>``."""
        return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}

    after = by_task("eval.after.greedy.")
    # eval.<policy>.<benchmark>.greedy: the recipe's eval.benchmarks (e.g. behaviours-ood)
    benchmarks = {k.split(".")[2]: {p: metrics.get(f"eval.{p}.{k.split('.')[2]}.greedy")
                                    for p in ("before", "after", "teacher")}
                  for k in metrics if k.startswith("eval.after.") and k.endswith(".greedy")
                  and k.count(".") == 3}
    return {
        "recipe": name + tag, "run_id": run_id, "overrides": overrides, "mode": cfg.mode,
        "objective": cfg.train.objective, "data": cfg.data.source,
        "before": metrics.get("eval.before.greedy"), "after": metrics.get("eval.after.greedy"),
        "teacher": metrics.get("eval.teacher.greedy"), "after_by_task": after,
        "before_by_task": by_task("eval.before.greedy."),
        "teacher_by_task": by_task("eval.teacher.greedy."),
        "benchmarks": benchmarks,
        "retention_logprob_delta": metrics.get("retention.logprob_delta"),
        "retention_exact_match": metrics.get("retention.exact_match"),
        # over the panel's questions (each one vote); the macro over tasks for runs before it
        "retention_panel_delta": metrics.get("retention.panel_questions_delta",
                                             metrics.get("retention.panel_delta")),
        "retention_panel_task_delta": by_task("retention.panel_delta."),
        "retention_text_delta": metrics.get("retention.text_logprob_delta"),
        "retention_rule_leak": metrics.get("retention.rule_leak"),
        "wall_s": wall, "pipeline_wall_s": metrics.get("wall_seconds"), "compute_s": compute_s,
        "stages_run": [s["label"] for s in stages if not s["cached"]],
        "train_s": total("seconds"), "tokens_trained": total("tokens_trained"),
        "steps": total("steps"), "final_loss": man.get("final_loss"),
        "train_means": man.get("means", {}), "passed_fraction": man.get("passed_fraction"),
    }


def seed_figures(result: dict) -> dict[str, float]:
    """The figures of one run that a seed can move, by column name: the macro pass rate after
    training, each task's, each benchmark's and the retention deltas (the panel's over its
    questions and per task, in pass-rate units; the base model's replies and reference text, in nats/token)."""
    figures = {"after": result.get("after")}
    figures |= {f"after:{t}": v for t, v in result.get("after_by_task", {}).items()}
    figures |= {f"{b}:after": c.get("after") for b, c in result.get("benchmarks", {}).items()}
    figures |= {"panel Δ": result.get("retention_panel_delta"),
                "replies Δ": result.get("retention_logprob_delta"),
                "text Δ": result.get("retention_text_delta")}
    figures |= {f"panel Δ:{t}": v for t, v in result.get("retention_panel_task_delta", {}).items()}
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float))}


def seed_spread(results: list[dict]) -> list[dict]:
    """Group runs of one recipe over seeds (``recipe[seed=S]``) and summarise each figure:
    mean, sample standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` (0 for one seed), min
    and max. Failed runs are left out of the figures and counted."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if "seed" in r:
            groups.setdefault(r["recipe"].rsplit("[seed=", 1)[0], []).append(r)
    out = []
    for recipe, runs in groups.items():
        ok = [seed_figures(r) for r in runs if "error" not in r]
        stats = {}
        for name in sorted({k for f in ok for k in f}):
            xs = [f[name] for f in ok if name in f]
            mean = sum(xs) / len(xs)
            sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
            stats[name] = {"mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "n": len(xs)}
        out.append({"recipe": recipe, "seeds": [r["seed"] for r in runs],
                    "failed": len(runs) - len(ok), "figures": stats})
    return out


def seed_markdown(spread: list[dict]) -> str:
    """One row per recipe and figure: mean ± sd [min, max] over its seeds, in percent or points
    for pass rates and the panel, nats/token for the text."""
    lines = ["| recipe | seeds | figure | mean ± sd | min | max |", "|---|---|---|---|---|---|"]
    for g in spread:
        seeds = ",".join(map(str, g["seeds"])) + (f" ({g['failed']} failed)" if g["failed"] else "")
        for name, st in g["figures"].items():
            nats = name in ("text Δ", "replies Δ")
            scale, fmt = (1.0, "{:+.3f}") if nats else (100.0, "{:.1f}")
            if name.startswith("panel Δ"):
                fmt = "{:+.1f}"
            cell = (lambda x: fmt.format(x * scale))
            lines.append(f"| {g['recipe']} | {seeds} | {name} | {cell(st['mean'])} ± "
                         f"{st['sd'] * scale:.{3 if nats else 1}f} | {cell(st['min'])} | "
                         f"{cell(st['max'])} |")
    return "\n".join(lines)


def _mode(name: str) -> str:
    import yaml

    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()).get("mode", "offline")


def _pct(v) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) else "-"


def _num(v, fmt="{:.0f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def _points(v) -> str:
    return f"{v * 100:+.1f} pts" if isinstance(v, (int, float)) else "-"


def _short(source) -> str:
    """The data column: a built-in suite's name, or a reasoning_gym task without its query."""
    return str(source or "-").split("?")[0].replace("reasoning_gym:", "rg:")


def markdown(results: list[dict], meta: dict) -> str:
    tasks = sorted({t for r in results for t in r.get("after_by_task", {})})
    lines = [
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPU cores, torch "
        f"{meta.get('torch', '?')}); command: `{meta['command']}`.",
        "",
        "| recipe | data | before | after | teacher (PI) | retention Δ log-lik | retention exact | "
        "general panel Δ | compute s | train s | steps | tokens trained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['recipe']} | | failed: {r['error'].splitlines()[-1][:80]} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['recipe']} | {_short(r.get('data'))} | {_pct(r['before'])} | **{_pct(r['after'])}** | "
            f"{_pct(r['teacher'])} | {_num(r['retention_logprob_delta'], '{:+.3f}')} | "
            f"{_pct(r['retention_exact_match'])} | {_points(r.get('retention_panel_delta'))} | "
            f"{_num(r.get('compute_s', r['wall_s']))} | {_num(r['train_s'])} | {_num(r.get('steps'))} | "
            f"{_num(r['tokens_trained'])} |")
    if tasks:
        lines += ["", "Held-out greedy compliance after training, per rule:", "",
                  "| recipe | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for r in results:
            if "error" not in r:
                lines.append(f"| {r['recipe']} | " + " | ".join(_pct(r["after_by_task"].get(t))
                                                             for t in tasks) + " |")
    names = sorted({b for r in results for b in r.get("benchmarks", {})})
    if names:
        lines += ["", "Benchmarks (`eval.benchmarks`), greedy pass rate before → after (teacher):", "",
                  "| recipe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in results:
            if "error" not in r:
                cells = [r.get("benchmarks", {}).get(b) for b in names]
                lines.append(f"| {r['recipe']} | " + " | ".join(
                    f"{_pct(c['before'])} → **{_pct(c['after'])}** ({_pct(c['teacher'])})" if c else "-"
                    for c in cells) + " |")
    lines += ["", "`before`/`after`: the student without privileged context (greedy held-out pass rate, "
              "macro over the data's tasks: the four rules of `behaviours`, 128 held-out questions); "
              "`teacher (PI)`: the same base model with its privileged context. `general panel Δ`: "
              "the retention panel's greedy pass rate over its questions (200 general questions and "
              "two held-out reasoning_gym tasks of 16) after minus before, in points. Retention: the trained student's mean per-token "
              "log-likelihood of the base model's greedy replies to 32 rule-free questions minus "
              "the base model's own, and the share of those questions where its greedy reply is "
              "token-identical. `compute s`: the seconds of every stage the recipe needs (evaluations "
              "included, dataset excluded) as measured by the run that computed it — stages shared "
              "by several recipes (rollouts, teacher targets, base evaluations) count for each."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("OPSD_HOME", "opsd-home"), help="storage root")
    ap.add_argument("--recipes", nargs="*", default=RECIPES + ONLINE_RECIPES)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every recipe")
    ap.add_argument("--set-offline", dest="offline_overrides", action="append", default=[],
                    help="override for the offline recipes only (e.g. train.steps=32)")
    ap.add_argument("--set-online", dest="online_overrides", action="append", default=[],
                    help="override for the online recipes only (e.g. online.iterations=8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recipes.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "recipes.md"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--tag", default="", help="suffix for the recipe names in the results, for a "
                    "variant run with --set (e.g. '[clip=none]')")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every recipe once per seed (train.seed) and add a mean ± sd table")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results of other recipes already in --out (run the set in parts)")
    args = ap.parse_args()
    from bench.machine import warn_if_busy

    warn_if_busy()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    meta = {"date": datetime.now().strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(), "torch": torch.__version__, "root": str(Path(args.root).resolve()),
            "command": " ".join(["python -m bench.compare_recipes"] + [
                a for a in sys.argv[1:] if not a.startswith("--root") and a != args.root])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    seeds = args.seeds or [None]
    runs = [(n, seed) for n in args.recipes for seed in seeds]
    if args.merge and out.exists():
        mine = {n + args.tag + ("" if seed is None else f"[seed={seed}]") for n, seed in runs}
        results = [r for r in json.loads(out.read_text())["results"] if r["recipe"] not in mine]
    order = {n: i for i, n in enumerate(RECIPES + ONLINE_RECIPES)}
    for name, seed in runs:
        t0 = time.perf_counter()
        tag = args.tag + ("" if seed is None else f"[seed={seed}]")
        seeded = [] if seed is None else [f"train.seed={seed}"]
        try:
            # every recipe enables retention; the quickstart does not, so switch it on for all
            by_mode = args.online_overrides if _mode(name) == "online" else args.offline_overrides
            res = run_recipe(name, args.root, ["retention.enabled=true", *args.overrides, *by_mode,
                                               *seeded], tag)
        except Exception as err:  # keep going: one broken recipe must not hide the others
            res = {"recipe": name + tag, "error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}",
                   "wall_s": time.perf_counter() - t0}
        if seed is not None:
            res["seed"] = seed
        results.append(res)
        results.sort(key=lambda r: (order.get(r["recipe"].split("[")[0], len(order)), r["recipe"]))
        spread = seed_spread(results)
        out.write_text(json.dumps({"meta": meta, "results": results, "seed_spread": spread},
                                  indent=2, default=str))
        if not args.no_docs:  # after every recipe: a long comparison shows its progress
            write_section(Path(args.docs), "recipes:results", markdown(results, meta),
                          "Comparison on the quickstart task")
        print(f"[compare] {name}{tag}: " + (f"after {_pct(res.get('after'))} (before {_pct(res.get('before'))}), "
                                      f"retention {_num(res.get('retention_logprob_delta'), '{:+.3f}')}, "
                                      f"wall {_num(res.get('wall_s'))}s" if "error" not in res
                                      else "FAILED " + res["error"].splitlines()[0]), flush=True)
    table = markdown(results, meta)
    print("\n" + table)
    if args.seeds:
        print("\nOver seeds (pass rates in %, panel Δ in points, replies/text Δ in nats/token):\n")
        print(seed_markdown(seed_spread(results)))
    if not args.no_docs:
        print(f"\nwrote {args.docs}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
