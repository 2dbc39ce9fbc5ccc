"""Render student prompts and privileged teacher prompts as token ids.

The student sees the row's prompt (one user turn, or a multi-turn conversation
ending with a user turn). The teacher sees the *same* turns, preceded by the
privileged information (PI):

* text views (``system`` rule, ``solution``, ``answer``, ``skills``, feedback …)
  are joined into one system message;
* ``demonstrations`` become real earlier user/assistant turns — as measured in
  DESIGN.md, a small model follows demonstrations rendered as turns and ignores
  the same text pasted into the user message.

Both prompts go through the tokenizer's chat template. :func:`teacher_ids`
checks that the teacher prompt ends with exactly the student's turns, so the
sampled response ids can be appended to either prompt and only the context
differs between student and teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from opsd.calibration import revise_text
from opsd.config import KNOWN_VIEWS, ContextConfig
from opsd.metrics import confidence_spans
from opsd.data import Row


class ContextError(ValueError):
    """PI rendering that would change the student's own turns or exceed the model."""


@dataclass
class TeacherContext:
    """What the teacher sees before the student's turns."""

    system: list[str] = field(default_factory=list)  # joined into one system message
    turns: list[dict] = field(default_factory=list)  # earlier chat turns (demonstrations)
    views: list[str] = field(default_factory=list)  # names of the views used, for logging

    def messages(self, student_messages: list[dict]) -> list[dict]:
        msgs = list(student_messages)
        own_system = None
        if msgs and msgs[0]["role"] == "system":
            own_system, msgs = msgs[0]["content"], msgs[1:]
        system_parts = ([own_system] if own_system else []) + self.system
        head = [{"role": "system", "content": "\n\n".join(system_parts)}] if system_parts else []
        return head + self.turns + msgs


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def student_ids(tokenizer, row: Row) -> list[int]:
    """The student's prompt: the row's turns and the assistant header."""
    return _ids(tokenizer, row.prompt_messages(), add_generation_prompt=True)


def student_turn_ids(tokenizer, row: Row) -> list[int]:
    """Token ids of the student's own turns (no system), as rendered after earlier turns.

    Rendered after a neutral exchange so templates that inject a default system
    prompt before the first turn do not leak into the result.
    """
    msgs = [m for m in row.prompt_messages() if m["role"] != "system"]
    lead = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
    full = _ids(tokenizer, lead + msgs, add_generation_prompt=True)
    base = _ids(tokenizer, lead, add_generation_prompt=False)
    if full[: len(base)] != base:
        raise ContextError("chat template renders earlier turns differently when more follow")
    return full[len(base) :]


def reveal(text: str, ratio: float) -> str:
    """The first ``ceil(ratio · words)`` words of ``text`` (partial solution exposure)."""
    if ratio >= 1.0:
        return text
    words = text.split()
    keep = math.ceil(ratio * len(words))
    return " ".join(words[:keep]) + (" …" if 0 < keep < len(words) else "") if keep else ""


def build_context(
    row: Row, cfg: ContextConfig, extra: dict | None = None, exposure: float | None = None,
    views: list[str] | None = None,
) -> TeacherContext:
    """The teacher context for ``row``.

    ``extra`` carries views computed during a run, taking precedence over the
    row's own: ``feedback`` = {attempt, feedback}, ``attempt`` = {attempt,
    verdict, reward}, ``sibling`` = a successful sibling's reply text, ``skills``
    = summarised lessons. ``exposure`` overrides ``cfg.exposure.ratio``;
    ``views`` overrides ``cfg.views`` (multi-view consensus).
    """
    pv = row.views()
    extra = extra or {}
    ratio = cfg.exposure.ratio if exposure is None else exposure
    ctx = TeacherContext()
    for name in views if views is not None else cfg.views:
        value = extra.get(name, getattr(pv, name, None) if name in PV_FIELDS else None)
        if value in (None, "", [], {}):
            continue
        if name == "demonstrations":
            for demo in value:
                ctx.turns.append({"role": "user", "content": demo.prompt})
                ctx.turns.append({"role": "assistant",
                                  "content": _demo_confidence(demo.completion, extra)})
        elif name == "sibling":
            if cfg.sibling_as == "turn":
                ctx.turns.extend(_as_turns(row, value))
            else:
                ctx.system.append(cfg.sibling_template.format(sibling=value))
        elif name == "system":
            ctx.system.insert(0, str(value))
        elif name == "solution":
            shown = reveal(str(value), ratio)
            if not shown:
                continue
            ctx.system.append(cfg.solution_template.format(solution=shown))
        elif name == "answer":
            ctx.system.append(cfg.answer_template.format(answer=value))
        elif name == "skills":
            ctx.system.append(cfg.skills_template.format(skills=value))
        elif name == "feedback":
            ctx.system.append(cfg.feedback_template.format(**value))
        elif name == "attempt":
            ctx.system.append(cfg.attempt_template.format(**value))
        elif name == "confidence":
            ctx.system.append(cfg.confidence_template.format(confidence=value))
        else:
            raise ContextError(f"unknown privileged view {name!r}; known: {', '.join(KNOWN_VIEWS)}")
        ctx.views.append(name)
    return ctx


PV_FIELDS = ("demonstrations", "solution", "answer", "system", "skills")


def _demo_confidence(completion: str, extra: dict) -> str:
    """CaOPD: a demonstration that states a confidence ("Confidence: 1.00") states the prompt's
    empirical pass rate instead when the run computed one (the ``confidence`` view)."""
    stated = extra.get("confidence")
    if stated is None or not confidence_spans(completion):
        return completion
    return revise_text(completion, stated)


def _as_turns(row: Row, reply: str) -> list[dict]:
    """A successful sibling as an earlier exchange: the same question, answered well."""
    question = [m for m in row.prompt_messages() if m["role"] == "user"][-1]["content"]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def teacher_ids(tokenizer, row: Row, ctx: TeacherContext, turn_ids: Sequence[int] | None = None) -> list[int]:
    """The teacher prompt; verified to end with the student's own turns unchanged."""
    turn = list(turn_ids) if turn_ids is not None else student_turn_ids(tokenizer, row)
    ids = _ids(tokenizer, ctx.messages(row.prompt_messages()), add_generation_prompt=True)
    if ids[len(ids) - len(turn) :] != turn:
        raise ContextError(
            f"row {row.id}: the chat template rendered the student's turns differently inside the "
            "teacher prompt; teacher and student would not score the same response positions"
        )
    return ids


def check_length(row_id: str, n_tokens: int, limit: int | None, what: str) -> None:
    if limit is not None and n_tokens > limit:
        raise ContextError(
            f"row {row_id}: the {what} is {n_tokens} tokens, over the model's limit of {limit}; "
            "shorten the privileged context or lower max_new_tokens"
        )
