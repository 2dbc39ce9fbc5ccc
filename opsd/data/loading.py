"""Loading dataset rows from a file (``.jsonl``/``.json``/``.parquet``) or a built-in suite.

Separate from :mod:`opsd.data.rows` (the row model) because the suites build ``Row`` objects:
rows ← suites ← loading keeps the imports pointing one way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from opsd.data.problems import DatasetError, Problem, single_problem
from opsd.data.rows import Row, Records, records_from_table, validate_records
from opsd.data.suites import BUILTIN_SUITES, load_suite, suite_name

# Limits on what a dataset file may hold, checked before anything is read into memory: a
# dataset is prompts (a long prompt with demonstrations is ~100 kB), so a multi-gigabyte file or
# a line of many megabytes is a mistake (a wrong file, a binary dump) or hostile. Raise them with
# the environment variables named in the message when a real dataset needs more.
MAX_FILE_BYTES = 2 << 30
MAX_LINE_BYTES = 16 << 20


def _limit(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def max_file_bytes() -> int:
    return _limit("OPSD_MAX_DATASET_BYTES", MAX_FILE_BYTES)


def max_line_bytes() -> int:
    return _limit("OPSD_MAX_LINE_BYTES", MAX_LINE_BYTES)


def load_rows(source: str | os.PathLike[str], *, seed: int = 0) -> list[Row]:
    """Load and validate rows from a ``.jsonl``/``.json``/``.parquet`` file or a built-in suite.

    Built-in suites (``behaviours``, ``reasoning_gym:<task>``) are recognised by
    name; ``seed`` only affects suites that sample (files keep file order).
    Raises :class:`DatasetError` listing every problem found.
    """
    source = os.fspath(source)
    if suite_name(source) in BUILTIN_SUITES:
        return load_suite(source, seed=seed)
    path = Path(source)
    readers = {".jsonl": _read_jsonl, ".json": _read_json_array, ".parquet": _read_parquet}
    if not path.is_file():
        raise single_problem(
            source,
            "file not found; give an existing .jsonl, .json or .parquet path "
            f"or a built-in suite ({', '.join(BUILTIN_SUITES)})",
        )
    reader = readers.get(path.suffix.lower())
    if reader is None:
        suffix = path.suffix or "(none)"
        raise single_problem(source, f"unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    size, limit = path.stat().st_size, max_file_bytes()
    if size > limit:
        raise single_problem(source, f"file is {size} bytes, over the limit of {limit} bytes for a "
                             "dataset; check it is the right file (or raise OPSD_MAX_DATASET_BYTES)")
    records, problems = reader(path)
    unit = "line" if path.suffix.lower() == ".jsonl" else "row"
    return validate_records(source, path.stem, unit, records, problems)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise single_problem(str(path), f"not UTF-8 text ({err}); save the file as UTF-8") from None


def _lines(path: Path):
    """(number, text) of each line, read one at a time and never more than the line limit (a
    10 GB line is refused after reading ``limit + 1`` bytes of it). Splits on "\\n" only:
    str.splitlines() also splits on characters JSON strings may hold."""
    limit = max_line_bytes()
    with path.open("rb") as fh:
        number = 0
        while True:
            raw = fh.readline(limit + 1)
            if not raw:
                return
            number += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise DatasetError([Problem(str(path), number, None, (
                    f"line is longer than the limit of {limit} bytes; one JSON row per line, "
                    "each a few kB (or raise OPSD_MAX_LINE_BYTES)"))])
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise single_problem(str(path), f"not UTF-8 text ({err}); save the file as UTF-8") \
                    from None


def _read_jsonl(path: Path) -> tuple[Records, list[Problem]]:
    records, problems = [], []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            reason = f"not valid JSON ({err}); write one JSON object per line"
            problems.append(Problem(str(path), number, None, reason))
    return records, problems


def _read_json_array(path: Path) -> tuple[Records, list[Problem]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        reason = f"not valid JSON ({err}); a .json file must hold one array of rows"
        return [], [Problem(str(path), err.lineno, None, reason)]
    if not isinstance(data, list):
        kind = type(data).__name__
        reason = f"expected a JSON array of row objects; got {kind} (use .jsonl for one object a line)"
        return [], [Problem(str(path), None, None, reason)]
    return list(enumerate(data, start=1)), []


def _read_parquet(path: Path) -> tuple[Records, list[Problem]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        return [], [Problem(str(path), None, None, f"cannot read Parquet: {err}")]
    return records_from_table(table, str(path))
