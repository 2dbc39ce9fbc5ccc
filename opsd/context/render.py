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

from dataclasses import dataclass, field
from typing import Sequence

from opsd.config import ContextConfig
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


def build_context(row: Row, cfg: ContextConfig, extra: dict[str, str] | None = None) -> TeacherContext:
    """The teacher context for ``row`` from its privileged views (plus ``extra`` text views).

    ``extra`` carries views computed during a run (verifier feedback, a sibling
    rollout, summarised skills) and takes precedence over the row's own.
    """
    views = row.views()
    ctx = TeacherContext()
    values: dict[str, object] = {
        "system": views.system,
        "solution": views.solution,
        "answer": views.answer if views.answer is not None else None,
        "skills": views.skills,
        "demonstrations": views.demonstrations,
    }
    for k, v in (extra or {}).items():
        values[k] = v
    templates = {
        "solution": cfg.solution_template,
        "answer": cfg.answer_template,
        "skills": cfg.skills_template,
    }
    for name in cfg.views:
        value = values.get(name)
        if value in (None, "", []):
            continue
        if name == "demonstrations":
            for demo in value:  # type: ignore[union-attr]
                ctx.turns.append({"role": "user", "content": demo.prompt})
                ctx.turns.append({"role": "assistant", "content": demo.completion})
        elif name == "system":
            ctx.system.insert(0, str(value))
        elif name in templates:
            ctx.system.append(templates[name].format(**{name: value}))
        else:
            ctx.system.append(str(value))
        ctx.views.append(name)
    return ctx


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
