"""The ``reasoning_gym:<task>`` suite: procedurally generated reasoning problems.

Each row carries the full reasoning-gym entry in its verifier, because several
tasks score against entry metadata rather than the answer string alone. Entries
go through :mod:`opsd.data.jsonsafe` so they survive JSONL/Parquet unchanged.
The teacher's privileged context is the answer, plus a worked solution where the
task provides one.
"""

from __future__ import annotations

from typing import Any

from opsd.data import jsonsafe
from opsd.data.rows import Row
from opsd.data.specs import ReasoningGymVerifier
from opsd.data.suites.source import SuiteSource

DEFAULT_COUNTS = {"train": 64, "eval": 32}
# Metadata keys under which reasoning-gym tasks store a worked solution, most explicit first.
_SOLUTION_KEYS = ("answer_cot", "solution")


def build(source: SuiteSource) -> list[Row]:
    """Rows for ``reasoning_gym:<task>[?train=N&eval=M&seed=S]``; eval rows follow the train rows."""
    import reasoning_gym  # slow import (~1.5 s): only when the suite is used

    task = source.arg
    if not task:
        raise source.error("name a task: reasoning_gym:<task>, e.g. reasoning_gym:basic_arithmetic")
    reason = ReasoningGymVerifier.unknown_task_reason(task)
    if reason:
        raise source.error(reason)
    counts = source.int_params({**DEFAULT_COUNTS, "seed": source.seed})
    size = counts["train"] + counts["eval"]
    if size == 0:
        raise source.error("train + eval is 0; ask for at least one row")
    dataset = reasoning_gym.create_dataset(task, size=size, seed=counts["seed"])
    train = [_row(task, dataset[i], "train", i, i) for i in range(counts["train"])]
    eval_ = [_row(task, dataset[i], "eval", i - counts["train"], i) for i in range(counts["train"], size)]
    return train + eval_


def _row(task: str, entry: dict[str, Any], split: str, index: int, source_index: int) -> Row:
    answer = None if entry.get("answer") is None else str(entry["answer"])
    views = {"answer": answer, "solution": _worked_solution(entry)}
    views = {name: text for name, text in views.items() if text is not None}
    return Row(
        id=f"{task}/{split}/{index:03d}",
        prompt=entry["question"],
        privileged_context=views or None,
        answer=answer,
        verifier={"type": "reasoning_gym", "task": task, "entry": jsonsafe.encode(entry)},
        split=split,
        task=task,
        metadata={"suite": "reasoning_gym", "source_index": source_index},
    )


def _worked_solution(entry: dict[str, Any]) -> str | None:
    metadata = entry.get("metadata") or {}
    for key in _SOLUTION_KEYS:
        text = metadata.get(key)
        if isinstance(text, str) and text.strip():
            return text
    return None
