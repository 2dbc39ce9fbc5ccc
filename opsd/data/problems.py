"""Dataset problems, reported all at once.

A user fixing a dataset should see every fault in one run, each with where it is
(file, line, field) and what to do about it, rather than fix-rerun-fix one error
at a time. Loaders therefore collect :class:`Problem` values and raise a single
:class:`DatasetError` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One fault in a dataset.

    ``line`` is the 1-based line for JSONL and the 1-based row number for JSON
    arrays and Parquet; None when the fault concerns the whole source.
    ``field`` is a dotted path such as ``prompt[1].role``; None for whole rows.
    """

    file: str
    line: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class DatasetError(ValueError):
    """Every problem found in a dataset; ``str()`` shows the first :attr:`MAX_SHOWN`."""

    MAX_SHOWN = 20

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        lines = [f"{count} problem{'' if count == 1 else 's'} in dataset:"]
        lines += [f"  {problem}" for problem in self.problems[: self.MAX_SHOWN]]
        if count > self.MAX_SHOWN:
            lines.append(f"  ... and {count - self.MAX_SHOWN} more")
        return "\n".join(lines)


def single_problem(file: str, reason: str) -> DatasetError:
    """A DatasetError for a fault in the source as a whole (missing file, bad suite name)."""
    return DatasetError([Problem(file, None, None, reason)])
