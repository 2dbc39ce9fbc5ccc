"""Teacher ceilings: where a teacher with privileged information beats its student, and by how much.

    python -m bench.ceilings [--suites behaviours facts reasoning_gym:gsm_symbolic ...]
                             [--eval 32] [--max-new-tokens 128] [--write docs/quality.md]

For every suite, the greedy pass rate on its eval split of

* the student alone (the built-in model, no context), and
* the same model as teacher, shown one privileged view at a time — each view any eval row
  carries (``solution``, ``answer``, ``demonstrations``, ``system``) — rendered exactly as the
  teacher stage renders it (``opsd.context.render``: text views in a system turn, demonstrations
  as earlier chat turns).

``gap`` = best teacher − student: the most a self-distillation recipe on that suite can hope to
move the student (OPSD trains the student toward the teacher; it does not exceed it). A suite with
no gap cannot be taught by self-distillation at this model size, whatever the objective.
In brackets: the share of greedy replies that contain the expected answer anywhere, whatever
their format (where rows have an answer). Reasoning-gym rows get an ``answer`` view always and a ``solution`` view where the task ships a
worked solution (see opsd.data.suites.reasoning_gym_suite).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_SUITES = (
    "behaviours?train=0&eval=16",
    "facts",
    "facts?context=entity",
    "general",
    # the reasoning-gym tasks that ship a worked solution (gsm_symbolic) or are short enough for
    # a small model to answer in one line
    "reasoning_gym:gsm_symbolic?train=0&eval=32",
    "reasoning_gym:sentence_reordering?train=0&eval=32",
    "reasoning_gym:family_relationships?train=0&eval=32",
    "reasoning_gym:spell_backward?train=0&eval=32",
    "reasoning_gym:calendar_arithmetic?train=0&eval=32",
)
VIEW_ORDER = ("demonstrations", "system", "solution", "answer")


def views_present(rows) -> list[str]:
    """The privileged views some row carries, in a fixed order."""
    have = set()
    for r in rows:
        pv = r.views()
        have |= {v for v in VIEW_ORDER if getattr(pv, v, None) not in (None, "", [])}
    return [v for v in VIEW_ORDER if v in have]


def contains_answer(rows, folder: Path) -> float | None:
    """Share of greedy replies that contain the row's expected answer anywhere (case-insensitive):
    whether the information is in the reply, whatever its format — a strict task scorer fails
    "The correct order is: You have tried it already." against "You have tried it already?"."""
    from opsd.storage.parquet import read_table

    answers = {r.id: r.answer for r in rows if r.answer}
    if not answers:
        return None
    t = read_table(folder).to_pydict()
    hits = [answers[rid].strip().lower().rstrip(".?!") in text.lower()
            for rid, text, g in zip(t["row_id"], t["text"], t["greedy"]) if g and rid in answers]
    return sum(hits) / len(hits) if hits else None


def ceilings(suite: str, *, max_new_tokens: int, batch_size: int, dtype: str, pool, policy,
             eval_limit: int | None = None, views: list[str] | None = None) -> dict:
    """Greedy pass rates (macro over tasks) of the student and of the teacher per view."""
    from opsd.config import ContextConfig, EvalConfig
    from opsd.data import load_rows
    from opsd.stages import evaluate
    from opsd.stages.common import StageContext

    rows = [r for r in load_rows(suite) if r.split == "eval"]
    if eval_limit:
        rows = rows[:eval_limit]
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype)
    out: dict = {"suite": suite, "rows": len(rows), "views": {}}
    present = [v for v in views_present(rows) if views is None or v in views]
    runs = [("student", None)] + [(v, ContextConfig(views=[v])) for v in present]
    for name, context in runs:
        t0 = time.perf_counter()
        ctx = StageContext(out_dir=Path(tempfile.mkdtemp(prefix="opsd-ceilings-")), pool=pool,
                           show_progress=False)
        m = evaluate.run(cfg, rows, policy, ctx, label=name, with_context=context)
        entry = {"greedy": m["greedy_macro"], "per_task": m["greedy"],
                 "truncated": m["greedy_truncated"], "seconds": time.perf_counter() - t0,
                 "contains": contains_answer(rows, ctx.out_dir)}
        shutil.rmtree(ctx.out_dir, ignore_errors=True)  # the replies were read: leave no /tmp litter
        if name == "student":
            out["student"] = entry
        else:
            out["views"][name] = entry
        print(f"  {suite:<55} {name:<15} {m['greedy_macro'] * 100:6.1f}%  "
              f"({entry['seconds']:.0f}s)", flush=True)
    best = max([v["greedy"] for v in out["views"].values()], default=out["student"]["greedy"])
    out["gap"] = best - out["student"]["greedy"]
    return out


def table(results: list[dict]) -> str:
    views = [v for v in VIEW_ORDER if any(v in r["views"] for r in results)]
    head = ["suite", "eval rows", "student"] + [f"teacher + {v}" for v in views] + ["gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(e: dict) -> str:
        # pass rate, and in brackets the share of replies that contain the answer at all
        c = e.get("contains")
        return f"{e['greedy'] * 100:.1f}%" + (f" ({c * 100:.0f}%)" if c is not None else "")

    for r in results:
        cells = [f"`{r['suite']}`", str(r["rows"]), cell(r["student"])]
        cells += [cell(r["views"][v]) if v in r["views"] else "-" for v in views]
        cells.append(f"**{r['gap'] * 100:+.1f}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="+", default=list(DEFAULT_SUITES))
    ap.add_argument("--eval", type=int, default=None, help="at most this many eval rows per suite")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--views", nargs="*", default=None,
                    help="only these privileged views (none given: the student alone)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ceilings.json"))
    ap.add_argument("--write", type=Path, default=None,
                    help="rewrite the ceilings section of this markdown file (docs/quality.md)")
    args = ap.parse_args(argv)

    from bench.machine import warn_if_busy
    from opsd.device import auto_dtype, resolve_device
    from opsd.models import resolve_model_path
    from opsd.pool import ModelPool, base_policy

    warn_if_busy()
    device = resolve_device("auto")
    dtype = auto_dtype(device).dtype
    pool = ModelPool(device=device)
    policy = base_policy(resolve_model_path(args.model))
    results = [ceilings(s, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        dtype=dtype, pool=pool, policy=policy, eval_limit=args.eval,
                        views=args.views)
               for s in args.suites]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    if args.write:
        from bench.docs import write_section

        note = (f"Measured {dt.date.today().isoformat()} on {device} ({dtype}), model "
                f"`{args.model}`, greedy, {args.max_new_tokens} new tokens; command: "
                f"`python -m bench.ceilings {' '.join(argv or [])}`.".replace("  ", " "))
        write_section(args.write, "ceilings", note + "\n\n" + text, "Teacher ceilings")
    return results


if __name__ == "__main__":
    main()
