"""Where a held-out reply missed its rule, would the teacher have written it there?

    python -m bench.rule_misses --root $OPSD_HOME --run RUN_ID
                                [--label evaluate/after/behaviours-ood] [--threshold 0.5]

For every greedy reply that a run's after-training evaluation scored against a *literal* start
or end rule (a regex verifier such as ``^\\s*Sure thing!`` or ``Hope this helps!\\s*$``): the
probability that the teacher (the base model with the row's privileged context, rendered as the
teacher stage renders it) and the trained student (the question alone) give the rule's text
where it belongs in that very reply,

    P(span | prefix) = prod_j p(span_j | prefix, span_<j),

where the prefix is the prompt for a start rule, and the prompt and the reply's own text (less
the span when the reply has it) for an end rule. A missed reply with the teacher's P at or above
the threshold is *student-limited*: the distillation signal exists on that reply and the student
did not take it (more or better-aimed training could). Below it, *teacher-limited*: the teacher
would not have written the rule there either, so self-distillation from this teacher cannot add
it, whatever the objective — only a better teacher or a different reply can. A missed end rule on
a reply the evaluation cut at ``eval.max_new_tokens`` is *cap-limited*: the reply never reached its
end, so neither side's probability there says whether it would have closed with the rule (its P
is still reported, at the cut). docs/quality.md uses it on the behaviours suite's
out-of-distribution misses.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

# a literal rule: "^\s*" + text (start) or text + "\s*$" (end), text with only escaped metacharacters
_START = re.compile(r"^\^\\s\*(?P<text>.+)$")
_END = re.compile(r"^(?P<text>.+)\\s\*\$$")
_META = set(".^$*+?{}[]|()")


@dataclass(frozen=True)
class LiteralRule:
    where: str  # "start" or "end"
    text: str


def literal_rule(pattern: str) -> LiteralRule | None:
    """The rule a regex verifier states, when it is one literal text that opens or closes the
    reply; None for anything else (an alternation, a class, a rule in the middle)."""
    for where, form in (("start", _START), ("end", _END)):
        m = form.match(pattern)
        if not m:
            continue
        body = m.group("text")
        text, i = [], 0
        while i < len(body):
            if body[i] == "\\":
                if i + 1 == len(body) or body[i + 1].isalnum():
                    return None  # \s, \d ...: a class, not a literal
                text.append(body[i + 1])
                i += 2
            elif body[i] in _META:
                return None
            else:
                text.append(body[i])
                i += 1
        return LiteralRule(where, "".join(text))
    return None


def without_span(reply: str, rule: LiteralRule) -> str:
    """The reply as it would read without the rule's text (unchanged when it does not carry it)."""
    body = reply.strip()
    if rule.where == "start" and body.startswith(rule.text):
        return body[len(rule.text):].strip()
    if rule.where == "end" and body.endswith(rule.text):
        return body[: -len(rule.text)].rstrip()
    return body


def span_ids(tokenizer, reply: str, rule: LiteralRule) -> tuple[list[int], list[int]]:
    """(reply ids before the span, span ids): a start rule's span opens an empty reply; an end
    rule's follows the reply's text after one space, as the demonstrations write it."""
    if rule.where == "start":
        return [], tokenizer.encode(rule.text, add_special_tokens=False)
    before = tokenizer.encode(reply, add_special_tokens=False)
    return before, tokenizer.encode((" " if reply else "") + rule.text, add_special_tokens=False)


def span_logprob(model, prefix: list[int], span: list[int]) -> float:
    """log P(span | prefix) = sum_j log p(span_j | prefix, span_<j), one forward pass."""
    import torch

    ids = torch.tensor([prefix + span], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prefix) - 1, len(prefix) + len(span) - 1, device=ids.device)
    return float(logp[positions, ids[0, len(prefix):]].sum())


def limited_by(passed: bool, cut: bool, rule: LiteralRule, p_teacher: float,
               threshold: float) -> str | None:
    """None for a pass; "cap" for an end rule on a reply cut at the token cap; else "student"
    when the teacher's P reaches the threshold, "teacher" below it."""
    if passed:
        return None
    if cut and rule.where == "end":
        return "cap"
    return "student" if p_teacher >= threshold else "teacher"


def score_replies(rows, replies: dict[str, tuple], tokenizer, teacher, student,
                  context_cfg, threshold: float = 0.5) -> list[dict]:
    """One record per scored reply (``replies``: row id → (greedy text, passed[, finish
    reason]); "length" marks a reply cut at the token cap); rows whose verifier is no literal
    start/end rule are skipped."""
    import math

    from opsd.context.render import build_context, student_ids, teacher_ids

    out = []
    for row in rows:
        if row.id not in replies or row.verifier is None or getattr(row.verifier, "pattern", None) is None:
            continue
        rule = literal_rule(row.verifier.pattern)
        if rule is None:
            continue
        text, passed, *finish = replies[row.id]
        cut = bool(finish) and finish[0] == "length"
        before, span = span_ids(tokenizer, without_span(text, rule), rule)
        p_teacher = math.exp(span_logprob(
            teacher, teacher_ids(tokenizer, row, build_context(row, context_cfg)) + before, span))
        p_student = math.exp(span_logprob(student, student_ids(tokenizer, row) + before, span))
        out.append({"row_id": row.id, "task": row.task, "multi_turn": isinstance(row.prompt, list),
                    "passed": bool(passed), "rule": rule.text, "where": rule.where, "cut": cut,
                    "p_teacher": p_teacher, "p_student": p_student, "reply": text,
                    "limited_by": limited_by(bool(passed), cut, rule, p_teacher, threshold)})
    return out


def summary(records: list[dict]) -> list[dict]:
    """Per task: replies, misses, misses that are student-/teacher-/cap-limited, mean P on each
    side over the misses that are not cap-limited."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rows = []
    for task, recs in sorted(by_task.items()):
        missed = [r for r in recs if not r["passed"]]
        scored = [r for r in missed if r["limited_by"] != "cap"]

        def mean(key, rs):
            return sum(r[key] for r in rs) / len(rs) if rs else None

        rows.append({"task": task, "replies": len(recs), "missed": len(missed),
                     "student_limited": sum(r["limited_by"] == "student" for r in missed),
                     "teacher_limited": sum(r["limited_by"] == "teacher" for r in missed),
                     "cap_limited": sum(r["limited_by"] == "cap" for r in missed),
                     "p_teacher_missed": mean("p_teacher", scored),
                     "p_student_missed": mean("p_student", scored)})
    return rows


def table(records: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| task | replies | missed | student-limited | teacher-limited | cut at the cap | "
             "mean P teacher (missed) | mean P student (missed) |", "|---|---|---|---|---|---|---|---|"]
    for s in summary(records):
        lines.append(f"| {s['task']} | {s['replies']} | {s['missed']} | {s['student_limited']} | "
                     f"{s['teacher_limited']} | {s['cap_limited']} | {pct(s['p_teacher_missed'])} | "
                     f"{pct(s['p_student_missed'])} |")
    lines += ["", "| missed reply | after an exchange | limited by | P teacher | P student | reply |",
              "|---|---|---|---|---|---|"]
    for r in records:
        if not r["passed"]:
            tail = r["reply"].replace("|", "/").replace("\n", " ")
            tail = tail if len(tail) <= 90 else "…" + tail[-89:]
            lines.append(f"| {r['row_id']} | {'yes' if r['multi_turn'] else 'no'} | {r['limited_by']} | "
                         f"{r['p_teacher']:.2f} | {r['p_student']:.2f} | {tail} |")
    return "\n".join(lines)


def run_artifacts(root: Path, run_id: str, label: str | None):
    """``([(label, data source, eval artifact dir)], config, catalog)`` for the run's
    after-training evaluations (``label``: only that one)."""
    from opsd.config import config_from_dict
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    cat = Catalog(Layout.at(root))
    run = cat.run(run_id)
    if run is None:
        raise SystemExit(f"no run {run_id!r} under {root}")
    run_id = run["run_id"]  # a prefix names the run too
    cfg = config_from_dict(run["config"], origin=f"run {run_id}")
    sources = {"evaluate/after": cfg.data.source}
    sources |= {f"evaluate/after/{b.label}": b.source for b in cfg.eval.benchmarks}
    found = []
    for stage in cat.stages(run_id):
        if stage["label"] in sources and (label is None or stage["label"] == label):
            art = cat.artifact(stage["key"])
            found.append((stage["label"], sources[stage["label"]], Path(art["path"])))
    if not found:
        raise SystemExit(f"run {run_id} has no after-training evaluation "
                         f"{'labelled ' + repr(label) if label else ''} with a stored artifact")
    return found, cfg, cat


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="the run's storage root (OPSD_HOME)")
    ap.add_argument("--run", required=True, help="run id (opsd runs)")
    ap.add_argument("--label", default=None, help="one evaluation, e.g. evaluate/after/behaviours-ood "
                    "(default: every after-training evaluation of the run)")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="teacher P at or above which a miss is student-limited")
    ap.add_argument("--out", type=Path, default=None, help="write every record as JSON here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.data import load_rows
    from opsd.models import resolve_model_path
    from opsd.storage.parquet import read_table

    found, cfg, cat = run_artifacts(args.root, args.run, args.label)
    run_id = cat.run(args.run)["run_id"]
    # the last training stage: online runs train once per iteration
    train = [s for s in cat.stages(run_id) if s["label"].split("/")[0] == "train"]
    if not train:
        raise SystemExit(f"run {args.run} has no train stage")
    student_dir = Path(cat.artifact(train[-1]["key"])["path"]) / "model"
    base_dir = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    # fp32: the probabilities do not depend on the machine's fast dtype
    teacher = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    records = []
    for label, source, folder in found:
        t = read_table(folder).to_pydict()
        replies = {rid: (text, bool(p), fin) for rid, text, p, fin, g in zip(
            t["row_id"], t["text"], t["passed"], t["finish_reason"], t["greedy"]) if g}
        rows = [r for r in load_rows(source, seed=cfg.data.seed) if r.split == "eval"]
        recs = score_replies(rows, replies, tokenizer, teacher, student, cfg.teacher.context,
                             args.threshold)
        print(f"\n{label} ({source}): {len(recs)} replies with a literal start/end rule\n")
        print(table(recs))
        records += [{"label": label, **r} for r in recs]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
