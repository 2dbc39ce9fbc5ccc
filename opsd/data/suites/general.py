"""The ``general`` suite: 200 everyday general-knowledge questions a small model answers well.

A general-capability check for the retention panel and ``eval.benchmarks``: short questions about
science, arithmetic, language and everyday life, each with a verifier that looks for the answer's
key word(s) anywhere in the reply (case-insensitive, whole words), so a style rule a recipe
teaches ("start with 'Sure thing!'") cannot fail a correct reply. None of them overlaps a built-in
suite's domain (capitals, cooking, animal facts, word meanings, the fictional world of ``facts``)
or the retention check's rule-free prompts. All rows are eval rows (nothing here is trained on).

There are 200 questions (:data:`~opsd.data.suites.general_data.QUESTIONS`, with the rules a
question and its key follow); one question is half a point of the panel. The first 48 are the
original panel, unchanged and in order: ``general?eval=48`` is the panel every figure before
2026-11-30 evening was measured on.
"""

from __future__ import annotations

from opsd.data.rows import Row
from opsd.data.suites.general_data import QUESTIONS
from opsd.data.suites.source import SuiteSource


def build(source: SuiteSource) -> list[Row]:
    """Rows for ``general[?eval=N]`` (all eval rows; at most N, in order)."""
    counts = source.int_params({"eval": len(QUESTIONS)})
    if source.arg is not None:
        raise source.error("the general suite takes no ':' argument")
    return [
        Row(id=f"general/eval/{i:03d}", prompt=q, answer=answer,
            verifier={"type": "regex", "pattern": rf"\b({key})\b", "flags": "i",
                      "description": f"mention {answer}"},
            split="eval", task="general", metadata={"suite": "general"})
        for i, (q, key, answer) in enumerate(QUESTIONS[: counts["eval"]])
    ]
