"""Confidence stage: CaOPD's revision of the rollouts' stated confidence (arXiv:2604.16830).

Reads a rollouts artifact and writes another one (the same Parquet schema, so the teacher and
train stages read it unchanged): every reply of a prompt whose rollouts have verdicts states,
in place of whatever confidence it stated, the prompt's empirical pass rate ``P_acc``
(opsd.calibration: the formula, the text and token rules). Per revised reply:

    response_ids        kept sampled prefix + the tokenised rest of the revised text (+ end token)
    behaviour_logprobs  the sampled ones on the kept prefix; on the new tokens, the log-probs of
                        the sampling policy reading the student's prompt (they were never sampled:
                        scored here so importance ratios, G-OPD's πRef and SCOPE's perplexity
                        stay those of the policy that would have produced them)
    text                the revised ids decoded, as the rollout stage writes it

Verdicts (reward, passed, feedback) stay the original attempt's: P_acc counts them. Guided
positions past the kept prefix are dropped (those tokens are gone).
"""

from __future__ import annotations

import time

import pyarrow as pa

from opsd.backends import make_scorer
from opsd.calibration import format_confidence, pass_rates, revise_ids
from opsd.config import ConfidenceConfig, TeacherConfig
from opsd.metrics import stated_confidence
from opsd.pool import Policy
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import ROLLOUTS, read_table, shard_name, write_table_atomic


def run(cfg: ConfidenceConfig, rollouts: Artifact, policy: Policy, ctx: StageContext, *,
        scoring: TeacherConfig) -> dict:
    """Revise ``rollouts`` (sampled from ``policy``); ``scoring``: the engine settings the new
    tokens are scored with (the teacher's: backend, dtype, batch size)."""
    t0 = time.perf_counter()
    data = read_table(rollouts.path).select(ROLLOUTS.names).to_pydict()
    tokenizer = ctx.pool.tokenizer(policy)
    rates = pass_rates(data["row_id"], data["passed"])
    stated = [stated_confidence(t) for t in data["text"]]
    revised, kept = [], []
    before = [len(r) for r in data["response_ids"]]
    for i, rid in enumerate(data["row_id"]):
        if rid not in rates:  # no verdicts: nothing to calibrate against
            revised.append(None)
            kept.append(len(data["response_ids"][i]))
            continue
        ids, k = revise_ids(data["response_ids"][i], data["text"][i], tokenizer,
                            format_confidence(rates[rid], cfg.decimals), cfg.template)
        revised.append(ids)
        kept.append(k)
    todo = [i for i, ids in enumerate(revised) if ids is not None]
    if todo:
        scorer = make_scorer(scoring, ctx.pool, policy)
        bar = ctx.progress(len(todo), "confidence (rescore new tokens)", "sample")
        scored = scorer.score([data["prompt_ids"][i] for i in todo], [revised[i] for i in todo], 1,
                              progress=bar.update)
        bar.close()
        for i, t in zip(todo, scored):
            k, new = kept[i], t.sampled_logprob_R.tolist()
            data["behaviour_logprobs"][i] = list(data["behaviour_logprobs"][i][:k]) + new[k:]
            data["response_ids"][i] = revised[i]
            data["text"][i] = tokenizer.decode(revised[i], skip_special_tokens=True)
            data["n_tokens"][i] = len(revised[i])
            data["guided_positions"][i] = [g for g in data["guided_positions"][i] or [] if g < k]
    write_table_atomic(pa.Table.from_pydict(data, schema=ROLLOUTS), ctx.out_dir / shard_name(0))
    known = [c for c in stated if c is not None]
    n = len(data["sample_id"])
    return {
        **{k: v for k, v in rollouts.manifest.items()
           if k not in ("stage", "label", "key", "inputs", "run_id")},  # the sampling's own summary
        "samples": n,
        "revised": len(todo),
        "prompts_with_rate": len(rates),
        "pass_rate_mean": sum(rates.values()) / len(rates) if rates else None,
        "stated_before": len(known) / max(1, n),  # how many replies stated a confidence
        "stated_mean_before": sum(known) / len(known) if known else None,
        # tokens of the revised replies that were never sampled / sampled ones given up
        "new_tokens": int(sum(len(revised[i]) - kept[i] for i in todo)),
        "dropped_tokens": int(sum(before[i] - kept[i] for i in todo)),
        "seconds": time.perf_counter() - t0,
    }
