"""Revise stage (SD-Zero, He et al. 2026, arXiv:2604.12002): the current model, acting as the
reviser, rewrites the iteration's attempts.

For an attempt ``y`` of prompt ``x`` with verdict ``r`` the reviser context ``c(x, y, r)`` is the
teacher's prompt for that sample — the ``teacher.context`` views, among them ``attempt`` (``y``
and ``r`` through ``attempt_template``), then the student's turns — built by the same function
the teacher stage uses, so the reviser that is trained here is exactly the teacher that scores
the attempts. The model samples ``train.reviser.n`` revisions ``ŷ ~ πθ(· | c)`` of every attempt
``train.reviser.revise`` selects (failed ones, or all), with the rollout's sampling settings, and
the row's verifier checks each. The passing ones are what the reviser term of the train step
fits (opsd.training.loss.reviser_nll):

    L_rev = −(1 / |R|) Σ_{ŷ passing} Σ_t log πθ(ŷ_t | c, ŷ_<t),   |R| = the tokens of those ŷ

Rows are written in shards of ``rollout.shard_size`` attempts (``REVISIONS``), each with its own
seed, so a killed stage resumes at the first missing shard and reproduces the same rows.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from transformers import AutoConfig

from opsd.backends.hf import HFGenerator, SamplingParams
from opsd.config import ReviserConfig, RolloutConfig, TeacherConfig
from opsd.context.render import check_length
from opsd.data import verify
from opsd.data.rows import Row
from opsd.pool import Policy
from opsd.stages.common import Artifact, StageContext, shard_seed
from opsd.stages.teacher import teacher_prompts
from opsd.storage.parquet import REVISIONS, completed_shards, read_table, shard_name, write_table_atomic
from opsd.training.batches import Example


def selected(passed: list, revise: str) -> list[int]:
    """Indices of the attempts to revise: with a verdict, and failed unless ``revise == 'all'``
    (an attempt without a verdict has no ``attempt`` view to revise from)."""
    return [i for i, p in enumerate(passed) if p is not None and (revise == "all" or not p)]


def run(cfg: ReviserConfig, rollout_cfg: RolloutConfig, teacher_cfg: TeacherConfig, rows: list[Row],
        rollouts: Artifact, policy: Policy, ctx: StageContext, *, iteration: int = 0,
        extra_views: dict[str, dict] | None = None, engine=None) -> dict:
    """Sample and verify the revisions of ``rollouts`` (``policy``: the current model, sampling
    with ``engine`` when given, else a copy from the pool); ``extra_views``: the run-time views of
    every sample (opsd.context.builders.dynamic_views), as the teacher stage gets them."""
    data = read_table(rollouts.path, columns=["sample_id", "row_id", "task", "prompt_ids",
                                              "response_ids", "passed", "reward"]).to_pydict()
    picked = selected(data["passed"], cfg.revise)
    attempts = {k: [v[i] for i in picked] for k, v in data.items()}
    tokenizer = ctx.pool.tokenizer(policy)
    max_len = getattr(AutoConfig.from_pretrained(policy.path), "max_position_embeddings", None)
    rows_by_id = {r.id: r for r in rows}
    contexts, _ = teacher_prompts(rows_by_id, attempts, teacher_cfg, tokenizer, max_len, extra_views)
    for row_id, ids in zip(attempts["row_id"], contexts):
        check_length(row_id, len(ids) + rollout_cfg.max_new_tokens, max_len,
                     "reviser prompt + max_new_tokens")
    n = len(picked)
    size = rollout_cfg.shard_size
    n_shards = max(1, -(-n // size))  # an empty shard when nothing is revised: the table exists
    done = completed_shards(ctx.out_dir)
    gen = None
    t0 = time.perf_counter()
    bar = ctx.progress(n * cfg.n, "revise", "revision")
    for shard in range(n_shards):
        lo, hi = shard * size, min(n, (shard + 1) * size)
        if shard in done:
            bar.update((hi - lo) * cfg.n)
            continue
        if gen is None:
            gen = engine or HFGenerator(ctx.pool.inference(policy, rollout_cfg.dtype), tokenizer,
                                        batch_size=rollout_cfg.batch_size)
        params = SamplingParams(n=cfg.n, temperature=rollout_cfg.temperature,
                                top_p=rollout_cfg.top_p, max_new_tokens=rollout_cfg.max_new_tokens,
                                seed=shard_seed(rollout_cfg.seed, shard, f"revise{iteration}"))
        gens = gen.generate(contexts[lo:hi], params, progress=bar.update) if hi > lo else []
        cols: dict[str, list] = {name: [] for name in REVISIONS.names}
        for g in gens:
            a = lo + g.prompt_index
            row = rows_by_id[attempts["row_id"][a]]
            text = tokenizer.decode(g.response_ids, skip_special_tokens=True)
            verdict = verify(row.verifier, text, row)  # selected attempts have a verifier
            cols["sample_id"].append(f"{attempts['sample_id'][a]}~r{g.sample_index}")
            cols["attempt_id"].append(attempts["sample_id"][a])
            cols["row_id"].append(row.id)
            cols["task"].append(attempts["task"][a])
            cols["prompt_ids"].append(contexts[a])
            cols["response_ids"].append(g.response_ids)
            cols["behaviour_logprobs"].append(g.logprobs)
            cols["text"].append(text)
            cols["finish_reason"].append(g.finish_reason)
            cols["reward"].append(verdict.reward)
            cols["passed"].append(verdict.passed)
            cols["feedback"].append(verdict.feedback)
            cols["n_tokens"].append(len(g.response_ids))
            cols["attempt_passed"].append(attempts["passed"][a])
            cols["attempt_reward"].append(attempts["reward"][a])
            cols["policy"].append(policy.key)
            cols["iteration"].append(iteration)
        write_table_atomic(pa.Table.from_pydict(cols, schema=REVISIONS),
                           ctx.out_dir / shard_name(shard))
    bar.close()
    return manifest_of(ctx, cfg, len(data["sample_id"]), n, time.perf_counter() - t0)


def manifest_of(ctx: StageContext, cfg: ReviserConfig, n_attempts: int, n_revised: int,
                seconds: float) -> dict:
    t = read_table(ctx.out_dir, columns=["passed", "attempt_passed", "n_tokens"]).to_pydict()

    def rate(flags: list) -> float | None:
        return sum(flags) / len(flags) if flags else None

    passed, before = t["passed"], t["attempt_passed"]
    return {
        "attempts": n_attempts,
        "revise": cfg.revise,
        "revised": n_revised,
        "revisions": len(passed),
        "passing": int(sum(passed)),
        "pass_rate": rate(passed),
        # the reviser's two jobs apart: fixing a failed attempt, keeping a passing one passing
        "fixed_rate": rate([p for p, b in zip(passed, before) if not b]),
        "kept_rate": rate([p for p, b in zip(passed, before) if b]),
        "response_tokens": int(sum(t["n_tokens"])),
        "trainable_tokens": int(sum(k for k, p in zip(t["n_tokens"], passed) if p)),
        "seconds_this_attempt": seconds,
    }


def revision_examples(revisions: Artifact) -> list[Example]:
    """The passing, non-empty revisions as training examples of the reviser term: the reviser
    context is the prompt, the revision the response (the distillation targets stay empty — the
    term reads only the sampled tokens)."""
    r = read_table(revisions.path, columns=["sample_id", "row_id", "prompt_ids", "response_ids",
                                            "behaviour_logprobs", "reward", "passed"]).to_pydict()
    out = []
    for i, sid in enumerate(r["sample_id"]):
        resp = list(r["response_ids"][i])
        if not r["passed"][i] or not resp:
            continue
        zeros_R = np.zeros(len(resp), dtype=np.float32)
        out.append(Example(
            sample_id=sid, prompt_ids=list(r["prompt_ids"][i]), response_ids=resp,
            behaviour_logp=np.asarray(r["behaviour_logprobs"][i], dtype=np.float32),
            teacher_logp=zeros_R, topk_ids=np.zeros((len(resp), 1), dtype=np.int32),
            topk_logp=np.zeros((len(resp), 1), dtype=np.float32), tail=zeros_R,
            reward=float(r["reward"][i]), group=r["row_id"][i], passed=True))
    return out
