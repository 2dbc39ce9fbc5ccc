"""Retention stage: did training keep what the base model could already do?

Gains on the taught task must not be bought with forgetting. Three measures, each taken for
the base model once (``retention_base``, shared by every run on that base) and for the trained
policy (``retention``), on material unrelated to anything a built-in suite teaches:

1. **panel** — greedy pass rate on a held-out general-capability panel (``cfg.panel``: the
   200-question ``general`` suite and two reasoning-gym tasks by default). The headline is
   ``panel_questions_delta`` = trained − base over the panel's *questions*, each question one vote
   (:func:`question_rate`), with ``panel_task_delta`` per task beside it; ``panel_delta`` is the
   macro over tasks, which two 16-question reasoning tasks at 0 % for a 135M model would dilute to
   a third of the general suite's change.
2. **reference text** — mean per-token log-likelihood of built-in reference passages
   (:data:`opsd.data.reference.REFERENCE_PASSAGES`) scored as plain text, outside any chat turn,
   so no reply-level rule acts on it: ``text_logprob_delta`` = trained − base (nats/token).
3. **replies** — on rule-free questions (:data:`GENERAL_PROMPTS`) the base model's own greedy
   replies are the reference: ``logprob`` is the trained student's mean per-token
   log-likelihood of those replies (``base_logprob`` the base's own, ``logprob_delta`` the
   difference); ``exact_match`` the share of questions whose trained greedy reply is the base
   reply token for token, ``prefix_match`` the mean share of the base reply reproduced before the
   first differing token.

**Taught spans.** A style rule changes every reply: once "start with 'Sure thing!'" is learned,
no greedy reply equals the base's any more (exact match ≤ 3 % for every recipe, whatever was
forgotten). A *taught span* is text that a taught verifier — a regex verifier of the run's
train rows (:func:`taught_rules`) — finds in the trained reply but not in the base reply to the
same prompt. Before comparing, it is taken out: the panel's replies are verified without it,
``exact_match_untaught`` compares the replies with it removed (whitespace-normalised text), and
``logprob_delta_untaught`` leaves out the reply positions where the rule acts — the first token
of the base reply when a span opens the trained reply, the last one (end of reply) when a span
closes it. ``rule_leak`` is the share of rule-free questions whose trained reply carries a taught
span (the rule applied where it was never taught).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from opsd.config import EvalConfig, RetentionConfig
from opsd.context.render import student_ids
from opsd.data import load_rows
from opsd.data.reference import REFERENCE_PASSAGES
from opsd.data.rows import Row
from opsd.data.specs import RegexVerifier
from opsd.pool import Policy
from opsd.stages import evaluate as evaluate_stage
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
TEXT_FILE = "reference_text.parquet"
PANEL_DIR = "panel"


# ------------------------------------------------------------------ taught spans


def taught_rules(rows: list[Row]) -> list[RegexVerifier]:
    """The distinct regex verifiers of the train rows: what the run teaches its student to write."""
    seen: dict[tuple[str, str], RegexVerifier] = {}
    for r in rows:
        if r.split == "train" and isinstance(r.verifier, RegexVerifier):
            seen.setdefault((r.verifier.pattern, r.verifier.flags), r.verifier)
    return list(seen.values())


class PanelMismatch(ValueError):
    """The base model's panel answers are for other questions than the panel asks now."""


@dataclass(frozen=True)
class Stripped:
    """A trained reply with its taught spans removed, and where they were."""

    text: str
    leaked: bool  # some taught span was found (and removed)
    at_start: bool  # a span opened the reply (nothing but whitespace before it)
    at_end: bool  # a span closed the reply


def strip_taught(text: str, base_text: str, rules: list[RegexVerifier]) -> Stripped:
    """Remove from ``text`` every match of a rule that does not match ``base_text`` (module docs).
    Zero-width matches (pure look-aheads) remove nothing."""
    spans: list[tuple[int, int]] = []
    for rule in rules:
        rx = rule.compiled()
        if rx.search(base_text):
            continue  # the base reply has it too: not taught by this run
        spans += [(m.start(), m.end()) for m in rx.finditer(text) if m.end() > m.start()]
    if not spans:
        return Stripped(text, False, False, False)
    keep, pos = [], 0
    for start, end in sorted(spans):
        if start >= pos:
            keep.append(text[pos:start])
        pos = max(pos, end)
    keep.append(text[pos:])
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    return Stripped("".join(keep), True, not text[:first].strip(), not text[last:].strip())


def _norm(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ model calls


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


def _reference_text(model, tokenizer, cfg: RetentionConfig) -> list[np.ndarray]:
    """Per-token log-likelihoods of the reference passages (each scored from its second token)."""
    if not cfg.reference_text:
        return []
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in REFERENCE_PASSAGES]
    return _logprobs(model, [x[:1] for x in ids], [x[1:] for x in ids], cfg)


def panel_rows(cfg: RetentionConfig) -> list[Row]:
    """The eval rows of every panel task (rows with a verifier)."""
    rows: list[Row] = []
    for source in cfg.panel:
        rows += [r for r in load_rows(source) if r.split == "eval" and r.verifier is not None]
    return rows


def _panel(cfg: RetentionConfig, policy: Policy, ctx: StageContext, label: str,
           transform=None) -> dict:
    if not cfg.panel:
        return {}
    out = ctx.out_dir / PANEL_DIR
    out.mkdir(exist_ok=True)
    ecfg = EvalConfig(max_new_tokens=cfg.panel_max_new_tokens, batch_size=cfg.batch_size,
                      dtype=cfg.dtype)
    sub = StageContext(out_dir=out, pool=ctx.pool, show_progress=ctx.show_progress)
    return evaluate_stage.run(ecfg, panel_rows(cfg), policy, sub, label=label, transform=transform)


# ------------------------------------------------------------------ the two stages


def base_run(cfg: RetentionConfig, base: Policy, ctx: StageContext) -> dict:
    """The base model's references: greedy replies to the general prompts with their
    log-likelihoods, the reference text's log-likelihoods, and its panel replies and pass rate."""
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
    text_lp = _reference_text(model, tokenizer, cfg)
    write_table_atomic(pa.Table.from_pydict({"logprobs": [x.tolist() for x in text_lp]}),
                       ctx.out_dir / TEXT_FILE)
    panel = _panel(cfg, base, ctx, "retention-base")
    return {"rows": len(prompts), "base_logprob": token_mean(logps),
            "reply_tokens": int(sum(len(r) for r in replies)),
            "text_base_logprob": token_mean(text_lp) if text_lp else None,
            "panel_base": panel.get("greedy_macro"), "panel_base_tasks": panel.get("greedy", {}),
            "seconds": time.perf_counter() - t0}


def run(cfg: RetentionConfig, base_art: Artifact, policy: Policy, ctx: StageContext,
        taught: list[RegexVerifier] | None = None) -> dict:
    """Score ``policy`` against the base references of ``base_art`` (see the module docs);
    ``taught``: the run's taught rules (:func:`taught_rules`), whose spans are left out."""
    t0 = time.perf_counter()
    _check_panel(cfg, base_art)
    rules = list(taught or []) if cfg.exclude_taught else []
    t = read_table(base_art.path / REPLIES_FILE).to_pydict()
    prompts, base_replies = t["prompt_ids"], t["response_ids"]
    tokenizer = ctx.pool.tokenizer(policy)
    model = ctx.pool.inference(policy, cfg.dtype)
    logps = _logprobs(model, prompts, base_replies, cfg)
    replies = _greedy(model, tokenizer, prompts, cfg)
    base_lp = [np.asarray(x, dtype=np.float32) for x in t["base_logprobs"]]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    stripped = [strip_taught(x, b, rules) for x, b in zip(texts, t["text"])]
    exact = [list(a) == list(b) for a, b in zip(replies, base_replies)]
    untaught = [_norm(s.text) == _norm(b) for s, b in zip(stripped, t["text"])]
    prefix = []
    for a, b in zip(replies, base_replies):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k / max(1, len(b)))
    # the reply positions where a rule acts are left out, for both models alike
    kept_new, kept_base = [], []
    for s, x, y in zip(stripped, logps, base_lp):
        lo, hi = int(s.at_start), len(x) - int(s.at_end)
        kept_new.append(x[lo:hi])
        kept_base.append(y[lo:hi])
    per_prompt = [
        {"prompt": q, "exact": e, "exact_untaught": u, "leak": s.leaked,
         "logprob": float(x.mean()) if len(x) else 0.0,
         "base_logprob": float(y.mean()) if len(y) else 0.0, "reply": r, "base_reply": b}
        for q, e, u, s, x, y, r, b in zip(t["prompt"], exact, untaught, stripped, logps, base_lp,
                                          texts, t["text"])
    ]
    (ctx.out_dir / "per_prompt.json").write_text(json.dumps(per_prompt, indent=1))
    logprob, base_logprob = token_mean(logps), token_mean(base_lp)
    out = {
        "rows": len(prompts),
        "logprob": logprob,
        "base_logprob": base_logprob,
        "logprob_delta": logprob - base_logprob,
        "logprob_delta_untaught": token_mean(kept_new) - token_mean(kept_base),
        "exact_match": float(np.mean(exact)) if exact else 0.0,
        "exact_match_untaught": float(np.mean(untaught)) if untaught else 0.0,
        "prefix_match": float(np.mean(prefix)) if prefix else 0.0,
        "rule_leak": float(np.mean([s.leaked for s in stripped])) if stripped else 0.0,
        "taught_rules": len(rules),
    }
    out.update(_text_metrics(base_art, model, tokenizer, cfg))
    out.update(_panel_metrics(cfg, base_art, policy, ctx, rules))
    out["seconds"] = time.perf_counter() - t0
    return out


def _text_metrics(base_art: Artifact, model, tokenizer, cfg: RetentionConfig) -> dict:
    path = base_art.path / TEXT_FILE
    if not cfg.reference_text or not path.exists():
        return {}
    base = [np.asarray(x, dtype=np.float32) for x in read_table(path).to_pydict()["logprobs"]]
    new = _reference_text(model, tokenizer, cfg)
    return {"text_logprob": token_mean(new), "text_base_logprob": token_mean(base),
            "text_logprob_delta": token_mean(new) - token_mean(base)}


def _check_panel(cfg: RetentionConfig, base_art: Artifact) -> None:
    """Under one key the panel's rows can differ from the base's only when a built-in suite was
    edited while the code version was pinned (OPSD_CODE_VERSION): two pass rates over different
    questions are no retention figure, so that is refused before anything is evaluated."""
    if not cfg.panel:
        return
    asked = {r.id for r in panel_rows(cfg)}
    answered = set(read_table(base_art.path / PANEL_DIR, columns=["row_id"]).to_pydict()["row_id"])
    if asked != answered:
        raise PanelMismatch(
            f"the base model's panel answers ({base_art.path / PANEL_DIR}) cover "
            f"{len(answered)} questions, the panel asks {len(asked)} ({len(asked - answered)} "
            "of them new): its rows changed under the same key. Unset or change OPSD_CODE_VERSION "
            "so that the base's panel is evaluated again.")


def question_rate(table: dict) -> tuple[float, int]:
    """Pass rate over the greedy rows of an evaluation table, each question one vote:
    ``sum(passed) / n`` over the rows with ``greedy`` set, and ``n``."""
    passed = [bool(p) for p, g in zip(table["passed"], table["greedy"]) if g]
    return (sum(passed) / len(passed) if passed else 0.0), len(passed)


def _panel_metrics(cfg: RetentionConfig, base_art: Artifact, policy: Policy, ctx: StageContext,
                   rules: list[RegexVerifier]) -> dict:
    if not cfg.panel:
        return {}
    base_t = read_table(base_art.path / PANEL_DIR).to_pydict()
    base_text = {rid: x for rid, x, g in zip(base_t["row_id"], base_t["text"], base_t["greedy"]) if g}

    def transform(row: Row, text: str) -> str:
        return strip_taught(text, base_text.get(row.id, ""), rules).text if rules else text

    m = _panel(cfg, policy, ctx, "retention", transform=transform)
    before = base_art.manifest.get("panel_base_tasks", {})
    out = {"panel": m["greedy_macro"], "panel_base": base_art.manifest.get("panel_base"),
           "panel_tasks": m["greedy"]}
    if out["panel_base"] is not None:
        out["panel_delta"] = m["greedy_macro"] - out["panel_base"]
    out["panel_task_delta"] = {k: v - before[k] for k, v in m["greedy"].items() if k in before}
    after_q, n = question_rate(read_table(ctx.out_dir / PANEL_DIR).to_pydict())
    base_q, _ = question_rate(base_t)
    out |= {"panel_questions": after_q, "panel_questions_base": base_q,
            "panel_questions_delta": after_q - base_q, "panel_questions_n": n}
    return out


METRICS = ("logprob", "base_logprob", "logprob_delta", "logprob_delta_untaught", "exact_match",
           "exact_match_untaught", "prefix_match", "rule_leak", "text_logprob", "text_base_logprob",
           "text_logprob_delta", "panel", "panel_base", "panel_delta", "panel_questions",
           "panel_questions_base", "panel_questions_delta")


def headline(art: Artifact | None) -> dict[str, float]:
    """``retention.*`` headline metrics of a retention artifact (and ``retention.panel.<task>``
    deltas per panel task)."""
    if art is None:
        return {}
    out = {f"retention.{k}": float(art.manifest[k]) for k in METRICS
           if isinstance(art.manifest.get(k), (int, float))}
    for task, v in (art.manifest.get("panel_task_delta") or {}).items():
        out[f"retention.panel_delta.{task}"] = float(v)
    return out
