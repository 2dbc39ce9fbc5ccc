"""Privileged views computed during a run, from the student's own rollouts.

* ``feedback`` — the verifier's feedback on the sample's own attempt, with the
  attempt (SDPO, RLTF-SD). Comes from the verifier, no model involved.
* ``sibling`` — a *successful* rollout of the same prompt, never the sample
  itself (SDPO); absent when no sibling passed.
* ``attempt`` — the sample's own reply and its binary reward (SD-Zero reviser).
* ``skills`` — lessons summarised from earlier rollouts of the same task or
  prompt (Skill-SD; see stages/summarise.py).
* ``confidence`` — the prompt's empirical pass rate over its rollouts, as the
  note CaOPD gives the teacher (opsd.calibration); absent for a prompt whose
  rollouts have no verdict.

The teacher then scores the sample's *unchanged* response ids with this extra
context; only the context differs from the student's.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from opsd.calibration import format_confidence, pass_rates
from opsd.config import ContextConfig

DYNAMIC = ("feedback", "sibling", "attempt", "skills", "confidence")


def needs_dynamic(cfg: ContextConfig) -> bool:
    wanted = set(cfg.views) | {v for vs in cfg.consensus_views for v in vs}
    return bool(wanted & set(DYNAMIC))


def dynamic_views(rollouts: dict, cfg: ContextConfig, skills: dict[str, str] | None = None,
                  group_by: str = "task", confidence_decimals: int = 2) -> dict[str, dict]:
    """sample_id → {view: value} for the dynamic views the config asks for."""
    wanted = (set(cfg.views) | {v for vs in cfg.consensus_views for v in vs}) & set(DYNAMIC)
    rates = pass_rates(rollouts["row_id"], rollouts["passed"]) if "confidence" in wanted else {}
    by_row: dict[str, list[int]] = defaultdict(list)
    for i, rid in enumerate(rollouts["row_id"]):
        by_row[rid].append(i)
    out: dict[str, dict] = {}
    for i, sid in enumerate(rollouts["sample_id"]):
        v: dict = {}
        text, passed = rollouts["text"][i], rollouts["passed"][i]
        if "feedback" in wanted and rollouts["feedback"][i]:
            v["feedback"] = {"attempt": text, "feedback": rollouts["feedback"][i]}
        if "attempt" in wanted and passed is not None:
            v["attempt"] = {"attempt": text, "verdict": "correct" if passed else "incorrect",
                            "reward": f"{rollouts['reward'][i]:g}"}
        if "sibling" in wanted:
            sib = next((j for j in by_row[rollouts["row_id"][i]]
                        if j != i and rollouts["passed"][j]), None)
            if sib is not None:
                v["sibling"] = rollouts["text"][sib]
        if "skills" in wanted and skills:
            group = rollouts["task"][i] if group_by == "task" else rollouts["row_id"][i]
            # a per-sample summary (summarise.exclude_self: written without this sample) first
            lesson = skills.get(sid) or skills.get(group)
            if lesson:
                v["skills"] = lesson
        if rollouts["row_id"][i] in rates:
            v["confidence"] = format_confidence(rates[rollouts["row_id"][i]], confidence_decimals)
        if v:
            out[sid] = v
    return out


def views_key(views: dict[str, dict]) -> str:
    """Content hash of the dynamic views (part of the teacher stage key)."""
    return hashlib.sha256(json.dumps(views, sort_keys=True).encode()).hexdigest()[:16]


def usage(views: dict[str, dict], n_samples: int) -> dict[str, float]:
    """Fraction of samples that received each dynamic view (logged per teacher pass)."""
    counts: dict[str, int] = defaultdict(int)
    for v in views.values():
        for name in v:
            counts[name] += 1
    return {f"with_{name}": counts[name] / max(1, n_samples) for name in DYNAMIC if name in counts}
