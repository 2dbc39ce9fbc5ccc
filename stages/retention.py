"""Retention stage: did training keep what the base model already did?

Gains on the taught rule must not be bought with forgetting. On a fixed set of
general questions that carry no rule (:data:`GENERAL_PROMPTS`), the *base*
model's own greedy replies are the reference:

- ``logprob``: the trained student's mean per-token log-likelihood of those
  replies, next to the base model's own (``base_logprob``); ``logprob_delta`` =
  trained − base (0: unchanged; negative: the student moved away from what it
  used to say);
- ``exact_match``: the share of questions whose trained greedy reply is token
  for token the base reply (the base model scores 1 by definition);
  ``prefix_match``: mean share of the base reply reproduced before the first
  differing token.

Two artifacts: ``retention_base`` (base replies + base log-likelihoods; shared by
every run on the same base model) and ``retention`` (one trained policy).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from opsd.config import RetentionConfig
from opsd.context.render import student_ids
from opsd.data.rows import Row
from opsd.pool import Policy
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import read_table, write_table_atomic

# Neutral, rule-free questions of the kind an instruct model answers every day (none of them
# overlaps the behaviours suite's questions).
GENERAL_PROMPTS: tuple[str, ...] = (
    "What is the boiling point of water at sea level?",
    "Name three primary colors.",
    "How many days are there in a leap year?",
    "What is the largest planet in our solar system?",
    "Explain what photosynthesis is in one sentence.",
    "What is the chemical symbol for gold?",
    "Who wrote the play Romeo and Juliet?",
    "How many continents are there on Earth?",
    "What is the square root of 81?",
    "Give me a synonym for the word 'happy'.",
    "What language is mainly spoken in Brazil?",
    "What does a thermometer measure?",
    "Translate 'thank you' into Spanish.",
    "What is the freezing point of water in Fahrenheit?",
    "Which organ pumps blood through the human body?",
    "What is the opposite of 'ancient'?",
    "How many legs does a spider have?",
    "What gas do humans need to breathe to survive?",
    "Name a mammal that can fly.",
    "What is the capital city of Japan?",
    "How many minutes are there in two hours?",
    "What is the main ingredient of guacamole?",
    "Describe the color of a clear daytime sky.",
    "What instrument has black and white keys?",
    "What is 15 multiplied by 4?",
    "Which season comes after winter?",
    "What do bees make?",
    "What is the tallest animal in the world?",
    "Write one sentence about why sleep is important.",
    "What shape has three sides?",
    "What is the currency of the United Kingdom?",
    "Suggest a name for a pet goldfish.",
)

REPLIES_FILE = "replies.parquet"


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    rows = [Row(id=f"retention/{i:02d}", prompt=q) for i, q in enumerate(GENERAL_PROMPTS[:n])]
    return [student_ids(tokenizer, r) for r in rows]


def _greedy(model, tokenizer, prompts, cfg: RetentionConfig) -> list[list[int]]:
    from opsd.backends.hf import HFGenerator, SamplingParams

    gen = HFGenerator(model, tokenizer, batch_size=cfg.batch_size)
    outs = gen.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    return [list(g.response_ids) for g in outs]


def _logprobs(model, prompts, replies, cfg: RetentionConfig) -> list[np.ndarray]:
    from opsd.backends.hf import sequence_logprobs

    return [lp.float().numpy() for lp in sequence_logprobs(model, prompts, replies,
                                                           batch_size=cfg.batch_size)]


def token_mean(logps: list[np.ndarray]) -> float:
    n = sum(len(x) for x in logps)
    return float(sum(float(x.sum()) for x in logps) / n) if n else 0.0


def base_run(cfg: RetentionConfig, base: Policy, ctx: StageContext) -> dict:
    """The base model's greedy replies to the general prompts and its own log-likelihoods."""
    t0 = time.perf_counter()
    tokenizer = ctx.pool.tokenizer(base)
    model = ctx.pool.inference(base, cfg.dtype)
    prompts = prompt_ids(tokenizer, cfg.prompts)
    replies = _greedy(model, tokenizer, prompts, cfg)
    logps = _logprobs(model, prompts, replies, cfg)
    table = pa.Table.from_pydict({
        "prompt_idx": list(range(len(prompts))),
        "prompt": list(GENERAL_PROMPTS[: len(prompts)]),
        "prompt_ids": prompts,
        "response_ids": replies,
        "text": [tokenizer.decode(r, skip_special_tokens=True) for r in replies],
        "base_logprobs": [x.tolist() for x in logps],
    })
    write_table_atomic(table, ctx.out_dir / REPLIES_FILE)
    return {"rows": len(prompts), "base_logprob": token_mean(logps),
            "reply_tokens": int(sum(len(r) for r in replies)), "seconds": time.perf_counter() - t0}


def run(cfg: RetentionConfig, base_art: Artifact, policy: Policy, ctx: StageContext) -> dict:
    """Score ``policy`` against the base replies of ``base_art`` (see the module docs)."""
    t0 = time.perf_counter()
    t = read_table(base_art.path / REPLIES_FILE).to_pydict()
    prompts, base_replies = t["prompt_ids"], t["response_ids"]
    tokenizer = ctx.pool.tokenizer(policy)
    model = ctx.pool.inference(policy, cfg.dtype)
    logps = _logprobs(model, prompts, base_replies, cfg)
    replies = _greedy(model, tokenizer, prompts, cfg)
    base_lp = [np.asarray(x, dtype=np.float32) for x in t["base_logprobs"]]
    exact = [list(a) == list(b) for a, b in zip(replies, base_replies)]
    prefix = []
    for a, b in zip(replies, base_replies):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k / max(1, len(b)))
    per_prompt = [
        {"prompt": q, "exact": e, "logprob": float(x.mean()) if len(x) else 0.0,
         "base_logprob": float(y.mean()) if len(y) else 0.0,
         "reply": tokenizer.decode(r, skip_special_tokens=True)}
        for q, e, x, y, r in zip(t["prompt"], exact, logps, base_lp, replies)
    ]
    (ctx.out_dir / "per_prompt.json").write_text(json.dumps(per_prompt, indent=1))
    logprob, base_logprob = token_mean(logps), token_mean(base_lp)
    return {
        "rows": len(prompts),
        "logprob": logprob,
        "base_logprob": base_logprob,
        "logprob_delta": logprob - base_logprob,
        "exact_match": float(np.mean(exact)) if exact else 0.0,
        "prefix_match": float(np.mean(prefix)) if prefix else 0.0,
        "seconds": time.perf_counter() - t0,
    }


METRICS = ("logprob", "base_logprob", "logprob_delta", "exact_match", "prefix_match")


def headline(art: Artifact | None) -> dict[str, float]:
    """``retention.*`` headline metrics of a retention artifact."""
    if art is None:
        return {}
    return {f"retention.{k}": float(art.manifest[k]) for k in METRICS if art.manifest.get(k) is not None}
