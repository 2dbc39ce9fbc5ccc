"""Teacher stage: privileged-teacher targets along the student's own rollouts.

For every rollout the teacher reads ``privileged context + the student's turns
+ the sampled response ids`` (the response ids are appended verbatim, never
re-tokenised) and we store, per response token, the teacher log-prob of the
sampled token, its top-k ids and log-probs and the tail mass. The student's
turns are verified to be token-identical inside the teacher prompt. Full
vocabulary distributions are never written.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from opsd.backends import make_scorer
from opsd.config import TeacherConfig
from opsd.context.render import build_context, check_length, student_ids, student_turn_ids, teacher_ids
from opsd.data.rows import Row
from opsd.pool import Policy
from stages.common import Artifact, StageContext, ids_hash
from storage.parquet import (CONTEXTS, CONTEXTS_FILE, TEACHER, completed_shards, read_table, shard_name,
                             write_table_atomic)


class RolloutMismatch(ValueError):
    """Rollouts that were not produced from these rows with this tokenizer."""


def teacher_prompts(
    rows_by_id: dict[str, Row], rollouts: dict, cfg: TeacherConfig, tokenizer, max_len: int | None,
    extra_views: dict[str, dict] | None = None, exposure: float | None = None,
    views: list[str] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Teacher prompt ids and the views used, one per rollout (cached per row and views)."""
    cache: dict[tuple, tuple[list[int], str]] = {}
    checked: set[str] = set()
    out_ids, out_views = [], []
    for i, (row_id, prompt_ids) in enumerate(zip(rollouts["row_id"], rollouts["prompt_ids"])):
        row = rows_by_id.get(row_id)
        if row is None:
            raise RolloutMismatch(f"rollout row {row_id!r} is not in the dataset artifact")
        if row_id not in checked:
            if list(prompt_ids) != student_ids(tokenizer, row):
                raise RolloutMismatch(
                    f"rollout {rollouts['sample_id'][i]}: its prompt ids differ from the row's "
                    "prompt rendered by this tokenizer (rollouts from another model or template)"
                )
            checked.add(row_id)
        extra = (extra_views or {}).get(rollouts["sample_id"][i])
        ck = (row_id, json.dumps(extra, sort_keys=True) if extra else None)
        if ck not in cache:
            ctx = build_context(row, cfg.context, extra, exposure=exposure, views=views)
            ids = teacher_ids(tokenizer, row, ctx, student_turn_ids(tokenizer, row))
            cache[ck] = (ids, ",".join(ctx.views))
        ids, used = cache[ck]
        check_length(row_id, len(ids) + len(rollouts["response_ids"][i]), max_len, "teacher sequence")
        out_ids.append(ids)
        out_views.append(used)
    return out_ids, out_views


def run(
    cfg: TeacherConfig,
    rows: list[Row],
    rollouts: Artifact,
    teacher: Policy,
    ctx: StageContext,
    *,
    extra_views: dict[str, dict] | None = None,
    exposure: float | None = None,
    scorer=None,
) -> dict:
    """Score every rollout; ``extra_views`` are run-time PI views per sample id
    (opsd.context.builders), ``exposure`` the solution reveal ratio of this pass."""
    tokenizer = ctx.pool.tokenizer(teacher)
    table = read_table(rollouts.path, columns=["sample_id", "row_id", "prompt_ids", "response_ids"])
    data = table.to_pydict()
    rows_by_id = {r.id: r for r in rows}
    max_len = _max_len(ctx, teacher)
    consensus = cfg.context.consensus != "none"
    view_sets = cfg.context.consensus_views if consensus else [None]
    per_view = [teacher_prompts(rows_by_id, data, cfg, tokenizer, max_len, extra_views, exposure, vs)
                for vs in view_sets]
    contexts, views = per_view[0]
    if consensus:
        views = ["|".join(pv[1][i] for pv in per_view) for i in range(len(views))]
    scorer = scorer or make_scorer(cfg, ctx.pool, teacher)
    n = len(data["sample_id"])
    done = completed_shards(ctx.out_dir)
    t0 = time.perf_counter()
    scored_tokens = 0
    bar = ctx.progress(n, f"teacher ({teacher.label or 'teacher'})", "sample")
    for shard in range(0, (n + cfg.shard_size - 1) // cfg.shard_size):
        lo, hi = shard * cfg.shard_size, min(n, (shard + 1) * cfg.shard_size)
        if shard in done:
            bar.update(hi - lo)
            continue
        responses = data["response_ids"][lo:hi]
        if consensus:
            targets = scorer.score_views([pv[0][lo:hi] for pv in per_view], responses, cfg.topk,
                                         cfg.context.consensus, progress=None)
            bar.update(hi - lo)
        else:
            targets = scorer.score(contexts[lo:hi], responses, cfg.topk, progress=bar.update)
        cols: dict[str, list] = {name: [] for name in TEACHER.names}
        for j, t in enumerate(targets):
            i = lo + j
            cols["sample_id"].append(data["sample_id"][i])
            cols["row_id"].append(data["row_id"][i])
            cols["context_len"].append(len(contexts[i]))
            cols["context_hash"].append(ids_hash(contexts[i]))
            cols["response_hash"].append(ids_hash(responses[j]))
            cols["n_tokens"].append(len(responses[j]))
            cols["sampled_logprobs"].append(t.sampled_logprob_R.tolist())
            cols["topk_ids"].append(t.topk_ids_RK.tolist())
            cols["topk_logprobs"].append(t.topk_logprobs_RK.tolist())
            cols["tail_mass"].append(t.tail_mass_R.tolist())
            cols["views"].append(views[i])
            cols["teacher"].append(teacher.key)
            cols["rollout_key"].append(rollouts.key)
            scored_tokens += len(responses[j])
        write_table_atomic(pa.Table.from_pydict(cols, schema=TEACHER), ctx.out_dir / shard_name(shard))
    bar.close()
    write_contexts(contexts, ctx.out_dir / CONTEXTS_FILE)
    seconds = time.perf_counter() - t0
    view_counts: dict[str, int] = {}
    for v in views:
        for name in set(filter(None, v.replace("|", ",").split(","))):
            view_counts[name] = view_counts.get(name, 0) + 1
    stats = getattr(scorer, "stats", {})
    return {
        "samples": n,
        "topk": cfg.topk,
        "response_tokens": int(sum(len(r) for r in data["response_ids"])),
        "seconds_this_attempt": seconds,
        "tokens_per_s_this_attempt": scored_tokens / seconds if seconds > 0 and scored_tokens else None,
        "views_used": {k: c / max(1, n) for k, c in view_counts.items()},
        "exposure": exposure if exposure is not None else cfg.context.exposure.ratio,
        "consensus": cfg.context.consensus,
        "scorer": {k: v for k, v in stats.items()},
    }


def write_contexts(contexts, path) -> None:
    """Each distinct teacher prompt once (context_hash → ids), for live-teacher objectives.
    With consensus scoring these are the first view set's prompts."""
    seen: dict[str, list[int]] = {}
    for ids in contexts:
        seen.setdefault(ids_hash(ids), list(ids))
    table = pa.Table.from_pydict({"context_hash": list(seen), "context_ids": list(seen.values())},
                                 schema=CONTEXTS)
    write_table_atomic(table, path)


def _max_len(ctx: StageContext, teacher: Policy) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher.path)
    return getattr(cfg, "max_position_embeddings", None)
