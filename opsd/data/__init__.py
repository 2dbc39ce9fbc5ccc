"""Datasets and verifiers: the rows every stage reads and how replies are scored."""

from opsd.data.problems import DatasetError, Problem
from opsd.data.rows import (
    Demonstration,
    Message,
    PrivilegedViews,
    Row,
    VerifierSpec,
    rows_from_table,
    rows_to_table,
    split_rows,
)
from opsd.data.loading import load_rows
from opsd.data.suites import BUILTIN_SUITES
from opsd.data.verifiers import Verdict, verify

__all__ = [
    "BUILTIN_SUITES",
    "DatasetError",
    "Demonstration",
    "Message",
    "PrivilegedViews",
    "Problem",
    "Row",
    "Verdict",
    "VerifierSpec",
    "load_rows",
    "rows_from_table",
    "rows_to_table",
    "split_rows",
    "verify",
]
