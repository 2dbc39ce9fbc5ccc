"""Summarise stage (Skill-SD): rollouts → short natural-language lessons per task or prompt.

For each group the model (the student by default) reads up to
``max_examples`` attempts marked pass/fail with the verifier's feedback and
writes a few bullet points: what worked, mistakes to avoid, the workflow. The
lessons are stored with the ids of the rollouts they came from and become the
``skills`` privileged view of the next teacher pass.

With ``exclude_self`` (Skill-SD: a summary must never be built from the sample it supervises)
each group is split into two folds (alternating samples) and each fold's samples get the
lessons written from the *other* fold's attempts (cross-fitting: two summaries per group
instead of one per sample).
"""

from __future__ import annotations

import time
from collections import defaultdict

import pyarrow as pa

from opsd.backends.hf import HFGenerator, SamplingParams
from opsd.config import SummariseConfig
from opsd.pool import Policy
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import read_table, write_table_atomic

SKILLS = pa.schema(
    [
        ("group", pa.string()),
        ("skills", pa.string()),
        ("source_sample_ids", pa.list_(pa.string())),
        ("n_sources", pa.int32()),
        ("pass_rate", pa.float32()),
        # exclude_self: the samples this summary is the skills view of (none of its sources)
        ("used_for", pa.list_(pa.string())),
    ],
    metadata={"opsd.kind": "skills"},
)


def _pick(indices: list[int], passed: list, k: int) -> list[int]:
    """Up to k examples, alternating passing and failing ones so contrasts are visible."""
    good = [i for i in indices if passed[i]]
    bad = [i for i in indices if not passed[i]]
    out = []
    while len(out) < k and (good or bad):
        for src in (good, bad):
            if src and len(out) < k:
                out.append(src.pop(0))
    return out


def run(cfg: SummariseConfig, rollouts: Artifact, policy: Policy, ctx: StageContext,
        dtype: str = "bfloat16", model=None) -> dict:
    t = read_table(rollouts.path, columns=["sample_id", "row_id", "task", "text", "passed",
                                           "feedback"]).to_pydict()
    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(len(t["sample_id"])):
        groups[t["task"][i] if cfg.group_by == "task" else t["row_id"][i]].append(i)
    tokenizer = ctx.pool.tokenizer(policy)
    model = model or ctx.pool.inference(policy, dtype)
    names, prompts, sources, used_for = [], [], [], []
    for name, idx, users in _jobs(groups, cfg.exclude_self):
        chosen = _pick(idx, t["passed"], cfg.max_examples)
        examples = "\n\n".join(
            f"Attempt {n + 1} ({'PASS' if t['passed'][i] else 'FAIL'}"
            f"{': ' + t['feedback'][i] if t['feedback'][i] and not t['passed'][i] else ''}):\n"
            f"{t['text'][i].strip()}"
            for n, i in enumerate(chosen)
        )
        msgs = [{"role": "user", "content": cfg.template.format(examples=examples)}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        names.append(name)
        sources.append([t["sample_id"][i] for i in chosen])
        used_for.append([t["sample_id"][i] for i in users])
    t0 = time.perf_counter()
    gen = HFGenerator(model, tokenizer, batch_size=16)
    bar = ctx.progress(len(prompts), "summarise", "group")
    outs = gen.generate(prompts, SamplingParams(n=1, temperature=0.0,
                                                max_new_tokens=cfg.max_new_tokens),
                        progress=bar.update)
    bar.close()
    skills = [tokenizer.decode(o.response_ids, skip_special_tokens=True).strip() for o in outs]
    rates = []
    for name in names:
        p = [t["passed"][i] for i in groups[name.split("#fold")[0]] if t["passed"][i] is not None]
        rates.append(sum(p) / len(p) if p else None)
    table = pa.Table.from_pydict({
        "group": names, "skills": skills, "source_sample_ids": sources,
        "n_sources": [len(s) for s in sources], "pass_rate": rates, "used_for": used_for,
    }, schema=SKILLS)
    write_table_atomic(table, ctx.out_dir / "skills.parquet")
    return {"groups": len(names), "skills": sum(bool(s) for s in skills),
            "mean_chars": sum(map(len, skills)) / max(1, len(skills)),
            "seconds": time.perf_counter() - t0}


def _jobs(groups: dict[str, list[int]], exclude_self: bool):
    """(summary name, rollouts it reads, rollouts it is for) per summary to write."""
    for name, idx in sorted(groups.items()):
        if not exclude_self:
            yield name, idx, idx
            continue
        folds = [idx[0::2], idx[1::2]]
        for f, users in enumerate(folds):
            others = folds[1 - f]
            if users and others:  # a lone sample has no other attempt to learn from
                yield f"{name}#fold{f}", others, users


def read_skills(art: Artifact) -> dict[str, str]:
    """group → lessons; with ``exclude_self`` sample id → the lessons written without it."""
    t = read_table(art.path / "skills.parquet").to_pydict()
    out = {}
    for group, skills, users in zip(t["group"], t["skills"], t.get("used_for") or [None] * len(t["group"])):
        if "#fold" in group:
            out.update({sid: skills for sid in users or []})
        else:
            out[group] = skills
    return out
