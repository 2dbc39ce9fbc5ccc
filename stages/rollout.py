"""Rollout stage: the student samples replies to the train prompts.

Stores per sample the prompt and response token ids exactly as sampled, the
behaviour log-prob of each sampled token, the decoded text, why generation
stopped, and the verifier's verdict and feedback. Work is split into shards of
``shard_size`` prompts, each written atomically with its own seed: a killed
stage resumes at the first missing shard and reproduces the same rows. Each missing
shard is one job for a shard runner (stages/shards.py): in this process, or one
Prefect task per shard on threads, processes or Ray (``runner.*``).

With ``rollout.brts`` each shard also holds one teacher-written reply per prompt (BRTS's
best-of-N choice, :func:`brts_replies`) and writes its selection records to
``selection-NNNNN.parquet`` before the shard file itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pyarrow as pa

from opsd import selection as brts_selection
from opsd.backends import make_generator
from opsd.backends.hf import Guidance, HFGenerator, SamplingParams, sequence_logprobs
from opsd.config import BRTSConfig, ContextConfig, RolloutConfig
from opsd.context.render import build_context, student_ids, student_turn_ids, teacher_ids
from opsd.data import verify
from opsd.data.rows import Row
from opsd.pool import Policy
from opsd.stages.common import StageContext, shard_seed
from opsd.stages.shards import (InlineShards, ShardRunner, dispatch, free_masters, summary, worker_id,
                           worker_pool)
from opsd.storage.parquet import (ROLLOUTS, SELECTION, completed_shards, shard_name,
                                  write_table_atomic)


def sample_rows(
    rows: list[Row],
    prompts: list[list[int]],
    generations,
    tokenizer,
    policy_key: str,
    iteration: int,
) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in ROLLOUTS.names}
    for g in generations:
        row = rows[g.prompt_index]
        text = tokenizer.decode(g.response_ids, skip_special_tokens=True)
        verdict = verify(row.verifier, text, row) if row.verifier is not None else None
        cols["sample_id"].append(f"{row.id}#{g.sample_index}")
        cols["row_id"].append(row.id)
        cols["sample_idx"].append(g.sample_index)
        cols["task"].append(row.task or "")
        cols["prompt_ids"].append(prompts[g.prompt_index])
        cols["response_ids"].append(g.response_ids)
        cols["behaviour_logprobs"].append(g.logprobs)
        cols["text"].append(text)
        cols["finish_reason"].append(g.finish_reason)
        cols["reward"].append(verdict.reward if verdict else None)
        cols["passed"].append(verdict.passed if verdict else None)
        cols["feedback"].append(verdict.feedback if verdict else None)
        cols["n_tokens"].append(len(g.response_ids))
        cols["policy"].append(policy_key)
        cols["iteration"].append(iteration)
        cols["guided_positions"].append(g.guided)
    return pa.Table.from_pydict(cols, schema=ROLLOUTS)


@dataclass(frozen=True)
class RolloutShard:
    """One shard's work: everything a worker needs to write ``out_path`` (picklable)."""

    cfg: RolloutConfig
    rows: list[Row]  # this shard's prompts
    shard: int
    seed: int
    iteration: int
    policy: Policy
    teacher: Policy | None  # guidance / sample_from=teacher
    context: ContextConfig | None
    out_path: Path
    device: str = "cpu"  # the run's device: a worker loads its models there


def write_shard(job: RolloutShard, tokenizer, engine, guide_model=None, progress=None) -> dict:
    """Sample the shard's replies with ``engine`` and write them atomically to ``job.out_path``."""
    cfg, chunk = job.cfg, job.rows
    from_teacher = cfg.sample_from == "teacher"
    prompts = [student_ids(tokenizer, r) for r in chunk]
    params = SamplingParams(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, seed=job.seed,
    )
    # the teacher's prompts (privileged context + the student's turns), built once for whatever
    # reads them: guidance, sampling from the teacher, the hinted rescue
    contexts = [
        teacher_ids(tokenizer, r, build_context(r, job.context), student_turn_ids(tokenizer, r))
        for r in chunk
    ] if cfg.needs_teacher() else None
    guidance = None
    if guide_model is not None and cfg.guidance.enabled:
        g = cfg.guidance
        guidance = Guidance(guide_model, contexts, g.threshold, g.min_teacher_prob, g.max_per_sample,
                            g.mode, g.mix)
    gen_prompts = contexts if from_teacher else prompts
    gens = engine.generate(gen_prompts, params, progress=progress, guidance=guidance)
    rescued = 0
    if cfg.rescue_tries and guide_model is not None:
        hinted = HFGenerator(guide_model, tokenizer, batch_size=cfg.batch_size)
        student_model = getattr(engine, "model", None)
        if cfg.rescue_behaviour == "student" and student_model is None:
            raise ValueError("rollout.rescue_behaviour: student scores the rescued replies with the "
                             "student: it needs the hf backend")
        gens, rescued = rescue(chunk, gens, contexts, hinted, tokenizer, params, cfg.rescue_tries,
                               student=(student_model, prompts)
                               if cfg.rescue_behaviour == "student" else None)
    table = sample_rows(chunk, prompts, gens, tokenizer,
                        job.teacher.key if from_teacher else job.policy.key, job.iteration)
    kept = []
    if cfg.brts.n and guide_model is not None:
        student_model = getattr(engine, "model", None)
        if student_model is None:
            raise ValueError("rollout.brts scores the teacher's replies with the student: it needs "
                             "the hf backend")
        recovery = [teacher_ids(tokenizer, r, build_context(r, job.context, views=_recovery_views(
            job.context, cfg.brts)), student_turn_ids(tokenizer, r)) for r in chunk]
        kept, records = brts_replies(
            chunk, prompts, contexts, recovery, HFGenerator(guide_model, tokenizer, batch_size=cfg.batch_size),
            student_model, tokenizer, params, cfg.brts, sample_index=cfg.n)
        if kept:
            table = pa.concat_tables([table, sample_rows(chunk, prompts, kept, tokenizer,
                                                         job.teacher.key, job.iteration)])
        # the selection first: the shard file is the commit marker a resumed stage looks for
        write_table_atomic(pa.Table.from_pylist(records, schema=SELECTION),
                           job.out_path.with_name(selection_name(job.shard)))
    write_table_atomic(table, job.out_path)
    gens = gens + kept
    return {"shard": job.shard, "samples": len(gens), "tokens": sum(len(g.response_ids) for g in gens),
            "rescued": rescued, "worker": worker_id()}


def selection_name(shard: int) -> str:
    """BRTS's selection records of a rollout shard (beside ``part-NNNNN.parquet``)."""
    return f"selection-{shard:05d}.parquet"


def _recovery_views(context: ContextConfig, cfg: BRTSConfig) -> list[str]:
    return list(context.views) + [v for v in cfg.recovery_views if v not in context.views]


def brts_replies(rows: list[Row], prompts: list[list[int]], contexts: list[list[int]],
                 recovery: list[list[int]], teacher, student_model, tokenizer,
                 params: SamplingParams, cfg: BRTSConfig, *, sample_index: int
                 ) -> tuple[list, list[dict]]:
    """BRTS's best-of-N teacher replies (:mod:`opsd.selection`) for the prompts of one shard.

    ``teacher`` (a generator over the teacher's prompts ``contexts``) samples ``cfg.n`` replies
    per prompt; a prompt none of whose replies passes gets ``cfg.recovery_tries`` more from its
    ``recovery`` prompt (the ground truth shown as well) — unless that prompt is the same as
    ``contexts[p]`` (the row has no ground-truth view: nothing to recover with). Every candidate
    is scored by ``student_model`` on the student's own prompt ``prompts[p]``. Returns the kept
    replies as generations of sample index ``sample_index`` (the teacher's behaviour log-probs,
    every position marked guided) and one selection record per prompt (schema ``SELECTION``).
    """
    from opsd.backends.hf import Generation

    def passes(p, g):
        return _passes(rows[p], g.response_ids, tokenizer)

    tier1 = replace(params, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                    seed=params.seed + 7919)  # streams of their own, apart from the student's
    pool: list[list[tuple[int, object]]] = [[] for _ in rows]
    for g in teacher.generate(contexts, tier1):
        pool[g.prompt_index].append((1, g))
    need = [p for p in range(len(rows)) if recovery[p] != contexts[p]
            and not any(passes(p, g) for _, g in pool[p])]
    if cfg.recovery_tries and need:
        for h in teacher.generate([recovery[p] for p in need],
                                  replace(tier1, n=cfg.recovery_tries, seed=params.seed + 15485863)):
            pool[need[h.prompt_index]].append((2, h))
    flat = [(p, g) for p in range(len(rows)) for _, g in pool[p]]
    lps = sequence_logprobs(student_model, [prompts[p] for p, _ in flat],
                            [g.response_ids for _, g in flat]) if flat else []
    mean_lp = iter([float(lp.mean()) if lp.numel() else -math.inf for lp in lps])
    kept, records = [], []
    for p, row in enumerate(rows):
        cands = [brts_selection.Candidate(tier, passes(p, g), next(mean_lp)) for tier, g in pool[p]]
        choice = brts_selection.choose(cands, cfg.fallback)
        if choice.index is not None:
            g = pool[p][choice.index][1]
            kept.append(Generation(p, sample_index, g.response_ids, g.logprobs, g.finish_reason,
                                   list(range(len(g.response_ids)))))
        records.append({
            "row_id": row.id,
            "sample_id": f"{row.id}#{sample_index}" if choice.index is not None else None,
            "tier": choice.tier, "chosen": choice.index, "reason": choice.reason,
            "candidates": [{"tier": c.tier, "passed": c.passed, "student_logp": c.student_logp,
                            "n_tokens": len(g.response_ids),
                            "text": tokenizer.decode(g.response_ids, skip_special_tokens=True)}
                           for c, (_, g) in zip(cands, pool[p])],
        })
    return kept, records


def read_selection(folder: Path) -> list[dict]:
    """Every BRTS selection record of a rollout artifact (empty when BRTS was off)."""
    import pyarrow.parquet as pq

    return [r for f in sorted(Path(folder).glob("selection-*.parquet"))
            for r in pq.read_table(f).to_pylist()]


def teacher_sample_ids(folder: Path) -> set[str]:
    """Sample ids of the replies the teacher wrote (BRTS's kept replies) in a rollout artifact."""
    return {r["sample_id"] for r in read_selection(folder) if r["sample_id"] is not None}


def _passes(row: Row, response_ids, tokenizer) -> bool:
    if row.verifier is None:
        return True  # nothing to rescue: no verdict
    return bool(verify(row.verifier, tokenizer.decode(response_ids, skip_special_tokens=True), row).passed)


def rescue(rows: list[Row], gens: list, contexts: list[list[int]], hinted, tokenizer,
           params: SamplingParams, tries: int, student=None) -> tuple[list, int]:
    """KEPO's knowledge-enhanced exploration (rejection sampling with a hint).

    For every prompt ``p`` none of whose ``n`` replies passes, ``tries`` replies are sampled from
    ``hinted`` reading the teacher's prompt ``contexts[p]`` (the privileged view is the hint);
    the first that passes replaces the prompt's last reply ``(p, n - 1)``, every position marked
    guided. Its behaviour log-probs are the hinted sampler's, or — ``student = (model,
    prompts)`` (``rollout.rescue_behaviour: student``) — ``log πS(y_t | prompts[p], y_<t)``, the
    student's own on its plain prompt, so the reply enters GRPO's ratio as the current policy's
    sample. Prompts already holding a passing reply, and those no hinted reply passes, keep
    their own. Returns the replies (same order) and the number of prompts rescued.
    """
    from opsd.backends.hf import Generation

    failing = sorted({g.prompt_index for g in gens}
                     - {g.prompt_index for g in gens if _passes(rows[g.prompt_index], g.response_ids, tokenizer)})
    if not failing:
        return gens, 0
    # a stream of its own: the student's replies do not depend on whether a rescue ran
    extra = hinted.generate([contexts[p] for p in failing],
                            replace(params, n=tries, seed=params.seed + 104729))
    found: dict[int, object] = {}
    for h in extra:  # ordered by (prompt, try): the first passing try of each prompt wins
        p = failing[h.prompt_index]
        if p not in found and _passes(rows[p], h.response_ids, tokenizer):
            found[p] = h
    behaviour = {p: h.logprobs for p, h in found.items()}
    if student is not None and found:
        model, prompts = student
        order = sorted(found)
        lps = sequence_logprobs(model, [prompts[p] for p in order],
                                [found[p].response_ids for p in order])
        behaviour = {p: [float(x) for x in lp] for p, lp in zip(order, lps)}
    last = params.n - 1
    out = []
    for g in gens:
        h = found.get(g.prompt_index)
        if h is not None and g.sample_index == last:
            g = Generation(g.prompt_index, last, h.response_ids, behaviour[g.prompt_index],
                           h.finish_reason, list(range(len(h.response_ids))))
        out.append(g)
    return out, len(found)


def run_shard(job: RolloutShard) -> dict:
    """:func:`write_shard` in a worker process: models come from the worker's own pool."""
    pool = worker_pool(job.device)
    cfg = job.cfg
    engine = make_generator(cfg, pool, job.teacher if cfg.sample_from == "teacher" else job.policy)
    guide = pool.inference(job.teacher, cfg.dtype) if cfg.needs_teacher_model() else None
    free_masters(pool)
    return write_shard(job, pool.tokenizer(job.policy), engine, guide)


def run(
    cfg: RolloutConfig,
    rows: list[Row],
    policy: Policy,
    ctx: StageContext,
    *,
    iteration: int = 0,
    engine=None,
    teacher: Policy | None = None,
    context: ContextConfig | None = None,
    guide_model=None,
    shards: ShardRunner | None = None,
) -> dict:
    """Sample ``cfg.n`` replies for every row in ``rows`` (already the train selection).

    With ``cfg.guidance.enabled`` the ``teacher`` (reading its privileged
    ``context``) decodes in lockstep and may replace strongly rejected tokens. With
    ``cfg.sample_from == "teacher"`` the teacher writes the replies itself (its behaviour
    log-probs are stored) while the stored prompt ids stay the student's.

    Every missing shard is one job for ``shards`` (default: in this process, in order). A
    remote runner (processes, Ray) loads the models in its workers; it is used only when
    this process holds no engine for the stage (``engine``/``guide_model`` not given) and the
    backend is hf — a vLLM engine parallelises itself (``rollout.vllm``).
    """
    from_teacher = cfg.sample_from == "teacher"
    if cfg.needs_teacher() and (teacher is None or context is None):
        raise ValueError("rollout.guidance / sample_from=teacher / rescue_tries need the teacher "
                         "policy and its context config")
    runner: ShardRunner = shards or InlineShards()
    done = completed_shards(ctx.out_dir)
    n_shards = (len(rows) + cfg.shard_size - 1) // cfg.shard_size
    jobs = [
        RolloutShard(cfg, rows[i * cfg.shard_size : (i + 1) * cfg.shard_size], i,
                     shard_seed(cfg.seed, i, f"it{iteration}"), iteration, policy,
                     teacher if cfg.needs_teacher() else None, context,
                     ctx.out_dir / shard_name(i), str(ctx.pool.device))
        for i in range(n_shards) if i not in done
    ]
    names = [f"rollout shard {j.shard + 1}/{n_shards}" for j in jobs]
    t0 = time.perf_counter()
    bar = ctx.progress(len(rows) * cfg.n, f"rollout ({policy.label or 'policy'})", "sample")
    bar.update(sum(min(cfg.shard_size, len(rows) - i * cfg.shard_size) for i in done) * cfg.n)

    def local():
        tokenizer = ctx.pool.tokenizer(policy)
        gen = engine or make_generator(cfg, ctx.pool, teacher if from_teacher else policy)
        guide = (guide_model or ctx.pool.inference(teacher, cfg.dtype)) if cfg.needs_teacher_model() else None
        return partial(write_shard, tokenizer=tokenizer, engine=gen, guide_model=guide,
                       progress=bar.update)

    runner, results = dispatch(
        runner, jobs, names, remote_fn=run_shard, local_fn=local, label="rollout",
        resident=engine is not None or guide_model is not None or cfg.backend != "hf",
        progress=bar.update)
    bar.close()
    seconds = time.perf_counter() - t0
    out = manifest_of(ctx, seconds, sum(r["tokens"] for r in results),
                    sum(r["samples"] for r in results))
    out["shards"] = summary(runner, n_shards, results)
    if cfg.rescue_tries:
        out["rescued_this_attempt"] = sum(r.get("rescued", 0) for r in results)
    if cfg.brts.n:
        records = read_selection(ctx.out_dir)
        tiers = [r["tier"] for r in records]
        out["brts"] = {"prompts": len(records), "kept": sum(t > 0 for t in tiers),
                       **{f"tier{t}": tiers.count(t) for t in (1, 2, 3)}, "none": tiers.count(0),
                       "teacher_candidates": sum(len(r["candidates"]) for r in records)}
    return out


def truncated_by_task(tasks: list[str | None], finish_reasons: list[str]) -> dict[str, float]:
    """Share of each task's replies cut at ``max_new_tokens`` (finish reason ``length``): their
    end is never generated, so a rule or answer that closes a reply is taught only on the rest."""
    counts: dict[str, list[int]] = {}
    for task, finish in zip(tasks, finish_reasons):
        c = counts.setdefault(task or "all", [0, 0])
        c[0] += finish == "length"
        c[1] += 1
    return {task: cut / n for task, (cut, n) in sorted(counts.items())}


def manifest_of(ctx: StageContext, seconds: float, tokens: int, generated: int) -> dict:
    from opsd.storage.parquet import read_table

    t = read_table(ctx.out_dir, columns=["sample_id", "task", "n_tokens", "passed", "finish_reason",
                                         "guided_positions"]).to_pydict()
    teacher_written = teacher_sample_ids(ctx.out_dir)
    if teacher_written:  # BRTS's teacher replies: the stage's numbers stay the student's
        keep = [i for i, s in enumerate(t["sample_id"]) if s not in teacher_written]
        t = {k: [v[i] for i in keep] for k, v in t.items()}
    passed = [p for p in t["passed"] if p is not None]
    n = len(t["n_tokens"])
    return {
        "samples": n,
        "response_tokens": int(sum(t["n_tokens"])),
        "mean_response_tokens": sum(t["n_tokens"]) / max(1, n),
        "truncated_fraction": sum(f == "length" for f in t["finish_reason"]) / max(1, n),
        "truncated_by_task": truncated_by_task(t["task"], t["finish_reason"]),
        "pass_rate": sum(passed) / len(passed) if passed else None,
        "guided_fraction": sum(bool(g) for g in t["guided_positions"]) / max(1, n),
        "guided_tokens": sum(len(g) for g in t["guided_positions"]),
        "seconds_this_attempt": seconds,
        "tokens_per_s_this_attempt": tokens / seconds if seconds > 0 and generated else None,
    }
