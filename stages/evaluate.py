"""Evaluate stage: held-out replies of a policy, scored by the rows' verifiers.

Greedy replies always; with ``samples = k > 0`` also k sampled replies per row
for avg@k / pass@k / maj@k. ``with_context`` evaluates the teacher: the same
policy *with* its privileged context — the ceiling self-distillation aims at.
Per-sample verdicts go to Parquet; the summary (per task and macro-averaged
over tasks) to ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable

import pyarrow as pa

from opsd.backends import make_generator
from opsd.backends.hf import SamplingParams
from opsd.config import EvalConfig, RolloutConfig
from opsd.context.render import build_context, student_ids, student_turn_ids, teacher_ids
from opsd.data import verify
from opsd.data.rows import Row
from opsd.data.verifiers import answer_of
from opsd.metrics import brier, ece, macro, majority_passed, pass_at_k, stated_confidence, vote
from opsd.pool import Policy
from opsd.stages.common import StageContext
from opsd.storage.parquet import EVAL_SAMPLES, shard_name, write_table_atomic


def _engine_cfg(cfg: EvalConfig, backend: str) -> RolloutConfig:
    return RolloutConfig(backend=backend, batch_size=cfg.batch_size, dtype=cfg.dtype,
                         max_new_tokens=cfg.max_new_tokens)


def run(
    cfg: EvalConfig,
    rows: list[Row],
    policy: Policy,
    ctx: StageContext,
    *,
    label: str,
    with_context=None,
    backend: str = "hf",
    engine=None,
    transform: Callable[[Row, str], str] | None = None,
) -> dict:
    """Evaluate ``policy`` on ``rows`` (the eval split). ``with_context``: a ContextConfig.
    ``transform(row, text)``: the text the verifier sees (the stored text stays the reply as
    generated); retention uses it to take the taught spans out of a reply before scoring it."""
    rows = [r for r in rows if r.verifier is not None]
    if not rows:
        return {"label": label, "rows": 0, "note": "no eval rows with a verifier"}
    tokenizer = ctx.pool.tokenizer(policy)
    if with_context is not None:
        prompts = [
            teacher_ids(tokenizer, r, build_context(r, with_context), student_turn_ids(tokenizer, r))
            for r in rows
        ]
    else:
        prompts = [student_ids(tokenizer, r) for r in rows]
    engine = engine or make_generator(_engine_cfg(cfg, backend), ctx.pool, policy)
    t0 = time.perf_counter()
    total = len(rows) * (1 + cfg.samples)
    bar = ctx.progress(total, f"evaluate ({label})", "reply")
    greedy = engine.generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens),
        progress=bar.update,
    )
    sampled = []
    if cfg.samples:
        sampled = engine.generate(
            prompts,
            SamplingParams(n=cfg.samples, temperature=cfg.temperature,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
            progress=bar.update,
        )
    bar.close()
    seconds = time.perf_counter() - t0
    cols: dict[str, list] = {name: [] for name in EVAL_SAMPLES.names}
    per_row: dict[str, list] = defaultdict(list)
    for g, is_greedy in [(g, True) for g in greedy] + [(g, False) for g in sampled]:
        row = rows[g.prompt_index]
        text = tokenizer.decode(g.response_ids, skip_special_tokens=True)
        v = verify(row.verifier, transform(row, text) if transform else text, row)
        cols["policy"].append(label)
        cols["row_id"].append(row.id)
        cols["task"].append(row.task or "")
        cols["sample_idx"].append(-1 if is_greedy else g.sample_index)
        cols["greedy"].append(is_greedy)
        cols["text"].append(text)
        cols["response_ids"].append(g.response_ids)
        cols["finish_reason"].append(g.finish_reason)
        cols["passed"].append(v.passed)
        cols["reward"].append(v.reward)
        cols["n_tokens"].append(len(g.response_ids))
        if not is_greedy:
            per_row[row.id].append((vote(answer_of(row.verifier, text), v.passed), v.passed))
    write_table_atomic(pa.Table.from_pydict(cols, schema=EVAL_SAMPLES), ctx.out_dir / shard_name(0))
    metrics = metrics_of(rows, cols, per_row, cfg.samples)
    metrics.update({"label": label, "rows": len(rows), "seconds": seconds})
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def metrics_of(rows: list[Row], cols: dict, per_row: dict, k: int) -> dict:
    task_of = {r.id: r.task or "all" for r in rows}
    greedy_by_task: dict[str, list[bool]] = defaultdict(list)
    for rid, g, p in zip(cols["row_id"], cols["greedy"], cols["passed"]):
        if g:
            greedy_by_task[task_of[rid]].append(p)
    out: dict = {"greedy": {t: sum(v) / len(v) for t, v in sorted(greedy_by_task.items())}}
    out["greedy_macro"] = macro(out["greedy"])
    lengths = [n for n, g in zip(cols["n_tokens"], cols["greedy"]) if g]
    truncated = [f == "length" for f, g in zip(cols["finish_reason"], cols["greedy"]) if g]
    out["greedy_mean_tokens"] = sum(lengths) / max(1, len(lengths))
    out["greedy_truncated"] = sum(truncated) / max(1, len(truncated))
    # calibration of the confidence greedy replies state (when any states one)
    stated = [(stated_confidence(t), p) for t, g, p in zip(cols["text"], cols["greedy"], cols["passed"])
              if g]
    known = [(c, p) for c, p in stated if c is not None]
    if known:
        conf, ok = [c for c, _ in known], [p for _, p in known]
        out["confidence_stated"] = len(known) / len(stated)
        out["confidence_mean"] = sum(conf) / len(conf)
        out["confidence_accuracy"] = sum(ok) / len(ok)
        out["ece"] = ece(conf, ok)
        out["brier"] = brier(conf, ok)
    if k:
        by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for rid, samples in per_row.items():
            t = task_of[rid]
            passed = [p for _, p in samples]
            c = sum(passed)
            by_task[t]["avg"].append(c / len(passed))
            by_task[t]["pass"].append(pass_at_k(len(passed), c, k))
            by_task[t]["maj"].append(float(majority_passed([a for a, _ in samples], passed)))
        for m in ("avg", "pass", "maj"):
            per = {t: sum(v[m]) / len(v[m]) for t, v in sorted(by_task.items())}
            out[f"{m}@{k}"] = per
            out[f"{m}@{k}_macro"] = macro(per)
    return out
