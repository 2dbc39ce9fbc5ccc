"""Rollout stage: the student samples replies to the train prompts.

Stores per sample the prompt and response token ids exactly as sampled, the
behaviour log-prob of each sampled token, the decoded text, why generation
stopped, and the verifier's verdict and feedback. Work is split into shards of
``shard_size`` prompts, each written atomically with its own seed: a killed
stage resumes at the first missing shard and reproduces the same rows.
"""

from __future__ import annotations

import time

import pyarrow as pa

from opsd.backends import make_generator
from opsd.backends.hf import Guidance, SamplingParams
from opsd.config import ContextConfig, RolloutConfig
from opsd.context.render import build_context, student_ids, student_turn_ids, teacher_ids
from opsd.data import verify
from opsd.data.rows import Row
from opsd.pool import Policy
from stages.common import StageContext, shard_seed
from storage.parquet import ROLLOUTS, completed_shards, shard_name, write_table_atomic


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
) -> dict:
    """Sample ``cfg.n`` replies for every row in ``rows`` (already the train selection).

    With ``cfg.guidance.enabled`` the ``teacher`` (reading its privileged
    ``context``) decodes in lockstep and may replace strongly rejected tokens. With
    ``cfg.sample_from == "teacher"`` the teacher writes the replies itself (its behaviour
    log-probs are stored) while the stored prompt ids stay the student's.
    """
    tokenizer = ctx.pool.tokenizer(policy)
    from_teacher = cfg.sample_from == "teacher"
    if from_teacher:
        # Off-policy data (the sft baseline): the teacher writes the replies from its privileged
        # prompt; the stored prompt ids are still the student's, so training sees the student's view.
        if teacher is None or context is None:
            raise ValueError("rollout.sample_from=teacher needs the teacher policy and its context config")
        engine = engine or make_generator(cfg, ctx.pool, teacher)
    engine = engine or make_generator(cfg, ctx.pool, policy)
    if cfg.guidance.enabled:
        if teacher is None or context is None:
            raise ValueError("guided rollouts need the teacher policy and its context config")
        guide_model = guide_model or ctx.pool.inference(teacher, cfg.dtype)
    else:
        guide_model = None
    done = completed_shards(ctx.out_dir)
    n_shards = (len(rows) + cfg.shard_size - 1) // cfg.shard_size
    t0 = time.perf_counter()
    tokens = generated = 0
    bar = ctx.progress(len(rows) * cfg.n, f"rollout ({policy.label or 'policy'})", "sample")
    bar.update(sum(min(cfg.shard_size, len(rows) - i * cfg.shard_size) for i in done) * cfg.n)
    for shard in range(n_shards):
        if shard in done:
            continue
        chunk = rows[shard * cfg.shard_size : (shard + 1) * cfg.shard_size]
        prompts = [student_ids(tokenizer, r) for r in chunk]
        params = SamplingParams(
            n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, seed=shard_seed(cfg.seed, shard, f"it{iteration}"),
        )
        guidance = None
        if guide_model is not None:
            g = cfg.guidance
            contexts = [
                teacher_ids(tokenizer, r, build_context(r, context), student_turn_ids(tokenizer, r))
                for r in chunk
            ]
            guidance = Guidance(guide_model, contexts, g.threshold, g.min_teacher_prob, g.max_per_sample)
        gen_prompts = prompts
        if from_teacher:
            gen_prompts = [
                teacher_ids(tokenizer, r, build_context(r, context), student_turn_ids(tokenizer, r))
                for r in chunk
            ]
        gens = engine.generate(gen_prompts, params, progress=bar.update, guidance=guidance)
        table = sample_rows(chunk, prompts, gens, tokenizer,
                            teacher.key if from_teacher else policy.key, iteration)
        write_table_atomic(table, ctx.out_dir / shard_name(shard))
        tokens += sum(len(g.response_ids) for g in gens)
        generated += len(gens)
    bar.close()
    seconds = time.perf_counter() - t0
    return summarize(ctx, seconds, tokens, generated)


def summarize(ctx: StageContext, seconds: float, tokens: int, generated: int) -> dict:
    from storage.parquet import read_table

    t = read_table(ctx.out_dir, columns=["n_tokens", "passed", "finish_reason", "guided_positions"]).to_pydict()
    passed = [p for p in t["passed"] if p is not None]
    n = len(t["n_tokens"])
    return {
        "samples": n,
        "response_tokens": int(sum(t["n_tokens"])),
        "mean_response_tokens": sum(t["n_tokens"]) / max(1, n),
        "truncated_fraction": sum(f == "length" for f in t["finish_reason"]) / max(1, n),
        "pass_rate": sum(passed) / len(passed) if passed else None,
        "guided_fraction": sum(bool(g) for g in t["guided_positions"]) / max(1, n),
        "guided_tokens": sum(len(g) for g in t["guided_positions"]),
        "seconds_this_attempt": seconds,
        "tokens_per_s_this_attempt": tokens / seconds if seconds > 0 and generated else None,
    }
