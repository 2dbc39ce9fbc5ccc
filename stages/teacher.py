"""Teacher stage: privileged-teacher targets along the student's own rollouts.

For every rollout the teacher reads ``privileged context + the student's turns
+ the sampled response ids`` (the response ids are appended verbatim, never
re-tokenised) and we store, per response token, the teacher log-prob of the
sampled token, its top-k ids and log-probs and the tail mass. The student's
turns are verified to be token-identical inside the teacher prompt. Full
vocabulary distributions are never written. Each missing shard is one job for a
shard runner (stages/shards.py), so shards can be scored by other processes or a
Ray cluster; the teacher prompts are built once, here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from opsd import routing
from opsd.backends import make_scorer
from opsd.config import TeacherConfig
from opsd.context.render import build_context, check_length, student_ids, student_turn_ids, teacher_ids
from opsd.data.rows import Row
from opsd.pool import Policy
from opsd.stages.common import Artifact, StageContext, ids_hash
from opsd.stages.shards import (InlineShards, ShardRunner, dispatch, free_masters, summary, worker_id,
                           worker_pool)
from opsd.storage.parquet import (CONTEXTS, CONTEXTS_FILE, REFERENCE, REFERENCE_FILE, ROUTED_TEACHER,
                                  TEACHER, completed_shards, read_table, shard_name,
                                  write_table_atomic)
from opsd.storage.parquet import NEGATIVE, NEGATIVE_FILE


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


@dataclass(frozen=True)
class TeacherShard:
    """One shard's work: the rollouts' ids, the teacher prompts and the file to write (picklable)."""

    cfg: TeacherConfig
    teacher: Policy
    shard: int
    sample_ids: list[str]
    row_ids: list[str]
    contexts: list[list[list[int]]]  # [view set][sample] teacher prompt ids (1 set unless consensus)
    responses: list[list[int]]
    views: list[str]
    rollout_key: str
    out_path: Path
    device: str = "cpu"  # the run's device: a worker loads the teacher there
    teacher_name: str | None = None  # MOPD: the named teacher every row of this shard routed to


def write_shard(job: TeacherShard, scorer, progress=None) -> dict:
    """Score the shard's responses with ``scorer`` and write the targets to ``job.out_path``."""
    cfg, responses = job.cfg, job.responses
    if cfg.context.consensus != "none":
        targets = scorer.score_views(job.contexts, responses, cfg.topk, cfg.context.consensus,
                                     tau=cfg.context.consensus_tau,
                                     progress=None)
        if progress:
            progress(len(responses))
    else:
        targets = scorer.score(job.contexts[0], responses, cfg.topk, progress=progress)
    contexts = job.contexts[0]
    schema = TEACHER if job.teacher_name is None else ROUTED_TEACHER
    cols: dict[str, list] = {name: [] for name in schema.names}
    for j, t in enumerate(targets):
        cols["sample_id"].append(job.sample_ids[j])
        cols["row_id"].append(job.row_ids[j])
        cols["context_len"].append(len(contexts[j]))
        cols["context_hash"].append(ids_hash(contexts[j]))
        cols["response_hash"].append(ids_hash(responses[j]))
        cols["n_tokens"].append(len(responses[j]))
        cols["sampled_logprobs"].append(t.sampled_logprob_R.tolist())
        cols["topk_ids"].append(t.topk_ids_RK.tolist())
        cols["topk_logprobs"].append(t.topk_logprobs_RK.tolist())
        cols["tail_mass"].append(t.tail_mass_R.tolist())
        cols["views"].append(job.views[j])
        cols["teacher"].append(job.teacher.key)
        cols["rollout_key"].append(job.rollout_key)
        if job.teacher_name is not None:
            cols["teacher_name"].append(job.teacher_name)
    write_table_atomic(pa.Table.from_pydict(cols, schema=schema), job.out_path)
    return {"shard": job.shard, "samples": len(responses),
            "tokens": int(sum(len(r) for r in responses)), "worker": worker_id()}


def run_shard(job: TeacherShard) -> dict:
    """:func:`write_shard` in a worker process: the teacher comes from the worker's own pool;
    the scorer's counters of this shard are returned with the result."""
    pool = worker_pool(job.device)
    scorer = make_scorer(job.cfg, pool, job.teacher)
    free_masters(pool)
    out = write_shard(job, scorer)
    out["scorer"] = dict(getattr(scorer, "stats", {}))
    return out


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
    shards: ShardRunner | None = None,
    reference: Policy | None = None,
    routed: dict[str, Policy] | None = None,
) -> dict:
    """Score every rollout; ``extra_views`` are run-time PI views per sample id
    (opsd.context.builders), ``exposure`` the solution reveal ratio of this pass; with
    ``reference`` (G-OPD's πRef, ``teacher.reference``) also that model's log-prob of every
    sampled token on the student's own prompt, into ``reference.parquet``. With ``routed`` (MOPD:
    name → policy of ``cfg.teachers``) each row is scored by the teacher ``cfg.route`` picks, with
    that teacher's views; its shards hold that teacher's rows only and name it (``teacher_name``).

    Teacher prompts are built here (cheap tokenisation, and the checks against the rows);
    every missing shard is then one job for ``shards`` (default: in this process). A remote
    runner is used only when no ``scorer`` is given and the backend is hf."""
    table = read_table(rollouts.path, columns=["sample_id", "row_id", "prompt_ids", "response_ids"])
    data = table.to_pydict()
    rows_by_id = {r.id: r for r in rows}
    consensus = cfg.context.consensus != "none"
    view_sets = cfg.context.consensus_views if consensus else [None]
    runner: ShardRunner = shards or InlineShards()
    n = len(data["sample_id"])
    done = completed_shards(ctx.out_dir)
    jobs, contexts, views, n_shards = [], [], [], 0
    # one group of samples per teacher (a single group without routing); shards are numbered
    # through the groups in order, so without routing they are the rollouts' consecutive chunks
    groups = _route(cfg, rows_by_id, data, teacher, routed)
    for name, policy, tcfg, idx in groups:
        sub = {k: [v[i] for i in idx] for k, v in data.items()}
        max_len = _max_len(ctx, policy)
        per_view = [teacher_prompts(rows_by_id, sub, tcfg, ctx.pool.tokenizer(policy), max_len,
                                    extra_views, exposure, vs) for vs in view_sets]
        g_contexts, g_views = per_view[0]
        if consensus:
            g_views = ["|".join(pv[1][i] for pv in per_view) for i in range(len(g_views))]
        contexts += g_contexts
        views += g_views
        for lo in range(0, len(idx), cfg.shard_size):
            shard, hi = n_shards, min(len(idx), lo + cfg.shard_size)
            n_shards += 1
            if shard in done:
                continue
            jobs.append(TeacherShard(
                tcfg, policy, shard, sub["sample_id"][lo:hi], sub["row_id"][lo:hi],
                [pv[0][lo:hi] for pv in per_view], sub["response_ids"][lo:hi], g_views[lo:hi],
                rollouts.key, ctx.out_dir / shard_name(shard), str(ctx.pool.device),
                teacher_name=name))
    names = [f"teacher shard {j.shard + 1}/{n_shards}" for j in jobs]
    t0 = time.perf_counter()
    bar = ctx.progress(n, f"teacher ({teacher.label or 'teacher'})", "sample")
    bar.update(n - sum(len(j.responses) for j in jobs))
    local_scorer: dict[str, object] = {}  # policy key → its scorer: each teacher loaded once

    def local():
        for j in jobs:
            if j.teacher.key not in local_scorer:
                local_scorer[j.teacher.key] = scorer or make_scorer(cfg, ctx.pool, j.teacher)
        return lambda job: write_shard(job, local_scorer[job.teacher.key], progress=bar.update)

    runner, results = dispatch(runner, jobs, names, remote_fn=run_shard, local_fn=local,
                               resident=scorer is not None or cfg.backend != "hf",
                               progress=bar.update, label="teacher")
    stats: dict = {}
    if runner.remote:  # each worker's scorer counters came back with its shards
        for r in results:
            for k, v in r.get("scorer", {}).items():
                stats[k] = stats.get(k, 0) + v
    else:
        for one in local_scorer.values():
            for k, v in (getattr(one, "stats", {}) or {}).items():
                stats[k] = stats.get(k, 0) + v
    bar.close()
    write_contexts(contexts, ctx.out_dir / CONTEXTS_FILE)
    ref_seconds = write_reference(cfg, ctx, reference, data) if reference is not None else None
    negative = None
    if cfg.negative_view is not None:  # CEPO's wrong-answer teacher, a second pass
        negative = write_negative(cfg, ctx, teacher, rows_by_id, rollouts, extra_views, exposure,
                                  scorer or next(iter(local_scorer.values()), None))
    seconds = time.perf_counter() - t0
    scored_tokens = sum(r["tokens"] for r in results)
    view_counts: dict[str, int] = {}
    for v in views:
        for name in set(filter(None, v.replace("|", ",").split(","))):
            view_counts[name] = view_counts.get(name, 0) + 1
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
        "shards": summary(runner, n_shards, results),
        **({"reference": reference.key, "reference_seconds_this_attempt": ref_seconds}
           if reference is not None else {}),
        **({"negative": negative} if negative is not None else {}),
        **({"route_by": cfg.route.by,
            "teachers": {name: {"key": pol.key, "samples": len(idx)}
                         for name, pol, _, idx in groups}} if routed else {}),
    }


def _route(cfg: TeacherConfig, rows_by_id: dict[str, Row], data: dict, teacher: Policy,
           routed: dict[str, Policy] | None) -> list[tuple[str | None, Policy, TeacherConfig, list[int]]]:
    """(name, policy, config with its views, sample indices) per teacher: one unnamed group of
    every sample without routing; with it (MOPD) every named teacher, in config order."""
    if not routed:
        return [(None, teacher, cfg, list(range(len(data["sample_id"]))))]
    default = cfg.default_teacher()
    names = []
    for rid in data["row_id"]:
        if rid not in rows_by_id:
            raise RolloutMismatch(f"rollout row {rid!r} is not in the dataset artifact")
        names.append(routing.route(rows_by_id[rid], cfg.route.by, cfg.route.map, default))
    out = []
    for t in cfg.teachers:
        tcfg = cfg if t.views is None else cfg.model_copy(
            update={"context": cfg.context.model_copy(update={"views": list(t.views)})})
        out.append((t.name, routed[t.name], tcfg, [i for i, nm in enumerate(names) if nm == t.name]))
    return out


def write_negative(cfg: TeacherConfig, ctx: StageContext, teacher: Policy, rows_by_id: dict,
                   rollouts: Artifact, extra_views: dict[str, dict] | None, exposure: float | None,
                   scorer=None) -> dict:
    """CEPO's wrong-answer teacher pass (Heakl et al. 2026, arXiv:2605.19436), into
    ``negative.parquet``: every sample with a rejected sibling (:func:`rejected_siblings`) is
    scored again with that sibling's reply in place of ``cfg.negative_view``'s value (the
    ground truth) in its otherwise unchanged context, giving ``log pT-(y_t)`` and the contrast
    ``c_t = log pT+(y_t) - log pT-(y_t)`` against the first pass's sampled log-probs. A sample
    without one keeps ``pT- = pT+`` (contrast 0: GRPO's uniform credit, as the reference code
    does for a group without a rejected reply). One file, written atomically; a rerun with the
    file present reuses it. Returns the manifest's summary."""
    path = ctx.out_dir / NEGATIVE_FILE
    if not path.exists():
        r = read_table(rollouts.path, columns=["sample_id", "row_id", "prompt_ids", "response_ids",
                                               "passed", "reward", "text"]).to_pydict()
        rejected = rejected_siblings(r)
        todo = [i for i, sid in enumerate(r["sample_id"]) if rejected[sid] is not None]
        views = {sid: dict((extra_views or {}).get(sid) or {}) for sid in r["sample_id"]}
        for i in todo:
            sid = r["sample_id"][i]
            views[sid][cfg.negative_view] = rejected[sid][1]
        scored = {}
        if todo:
            sub = {k: [v[i] for i in todo] for k, v in r.items()}
            contexts, _ = teacher_prompts(rows_by_id, sub, cfg, ctx.pool.tokenizer(teacher),
                                          _max_len(ctx, teacher), views, exposure)
            scorer = scorer or make_scorer(cfg, ctx.pool, teacher)
            scored = dict(zip(sub["sample_id"], scorer.score(contexts, sub["response_ids"], 1)))
        pos = read_table(ctx.out_dir, columns=["sample_id", "sampled_logprobs"]).to_pydict()
        pos = dict(zip(pos["sample_id"], pos["sampled_logprobs"]))
        cols: dict[str, list] = {name: [] for name in NEGATIVE.names}
        for sid in r["sample_id"]:
            plus = np.asarray(pos[sid], dtype=np.float32)
            minus = scored[sid].sampled_logprob_R.numpy() if sid in scored else plus
            cols["sample_id"].append(sid)
            cols["rejected_from"].append(rejected[sid][0] if rejected[sid] else None)
            cols["negative_logprobs"].append(minus.tolist())
            cols["contrast"].append((plus - minus).tolist())
        write_table_atomic(pa.Table.from_pydict(cols, schema=NEGATIVE), path)
    t = read_table(path, columns=["rejected_from", "contrast"]).to_pydict()
    c = np.concatenate([np.asarray(x, dtype=np.float64) for x in t["contrast"]] or [np.zeros(0)])
    return {"view": cfg.negative_view,
            "with_rejected": sum(x is not None for x in t["rejected_from"]) / max(1, len(t["contrast"])),
            "contrast_mean": float(c.mean()) if c.size else 0.0,
            "contrast_abs_mean": float(np.abs(c).mean()) if c.size else 0.0}


def rejected_siblings(rollouts: dict) -> dict[str, tuple[str, str] | None]:
    """sample_id → (sibling sample_id, its reply text) of the sample's wrong-answer reference:
    the failing reply of the same prompt with the lowest reward (the reference code's "worst
    rejected rollout"; ties → the earlier sample), never the sample itself; None when the prompt
    has no other failing reply."""
    by_row: dict[str, list[int]] = {}
    for i, rid in enumerate(rollouts["row_id"]):
        by_row.setdefault(rid, []).append(i)
    out: dict[str, tuple[str, str] | None] = {}
    for i, sid in enumerate(rollouts["sample_id"]):
        failing = [j for j in by_row[rollouts["row_id"][i]]
                   if j != i and rollouts["passed"][j] is False]
        if not failing:
            out[sid] = None
            continue
        j = min(failing, key=lambda k: (rollouts["reward"][k] if rollouts["reward"][k] is not None
                                        else 0.0, k))
        out[sid] = (rollouts["sample_id"][j], rollouts["text"][j])
    return out


def write_reference(cfg: TeacherConfig, ctx: StageContext, reference: Policy, data: dict) -> float:
    """G-OPD's ``log πRef(y_t | x, y_<t)`` for every sampled token: the reference model reads the
    student's prompt ids (no privileged context) and the response ids verbatim. One file,
    written atomically; a rerun with the file present skips it. Returns the seconds spent."""
    path = ctx.out_dir / REFERENCE_FILE
    if path.exists():
        return 0.0
    t0 = time.perf_counter()
    scorer = make_scorer(cfg, ctx.pool, reference)
    bar = ctx.progress(len(data["sample_id"]), f"reference ({reference.label or 'reference'})", "sample")
    targets = scorer.score(data["prompt_ids"], data["response_ids"], 1, progress=bar.update)
    bar.close()
    write_table_atomic(pa.Table.from_pydict({
        "sample_id": list(data["sample_id"]),
        "reference_logprobs": [t.sampled_logprob_R.tolist() for t in targets],
    }, schema=REFERENCE), path)
    return time.perf_counter() - t0


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
