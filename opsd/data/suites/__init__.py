"""Built-in suites: datasets that opsd can build without any file.

``load_rows("behaviours")`` or ``load_rows("reasoning_gym:leg_counting?train=32")``
go through :func:`load_suite`; see :mod:`opsd.data.suites.source` for the grammar.
"""

from __future__ import annotations

from collections.abc import Callable

from opsd.data.rows import Row
from opsd.data.suites import behaviours, facts, general, reasoning_gym_suite
from opsd.data.suites.source import SuiteSource, suite_name

BUILTIN_SUITES: dict[str, Callable[[SuiteSource], list[Row]]] = {
    "behaviours": behaviours.build,
    "facts": facts.build,
    "general": general.build,
    "reasoning_gym": reasoning_gym_suite.build,
}


def load_suite(source: str, *, seed: int = 0) -> list[Row]:
    """Build the rows of a built-in suite; raises DatasetError for a bad name or query."""
    parsed = SuiteSource.parse(source, seed=seed)
    if parsed.name not in BUILTIN_SUITES:
        raise parsed.error(f"unknown suite {parsed.name!r}; built-in suites: {', '.join(BUILTIN_SUITES)}")
    return BUILTIN_SUITES[parsed.name](parsed)


__all__ = ["BUILTIN_SUITES", "SuiteSource", "load_suite", "suite_name"]
