"""bench/ceilings.py's report: the share of replies that contain the answer, and its table."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

from bench.ceilings import contains_answer, table


def test_contains_answer_counts_greedy_replies_holding_the_answer_anywhere(tmp_path):
    rows = [SimpleNamespace(id="a", answer="You have tried it already?"),
            SimpleNamespace(id="b", answer="42"), SimpleNamespace(id="c", answer=None)]
    pq.write_table(pa.table({
        "row_id": ["a", "a", "b", "c"],
        "text": ["The correct order is: you have tried it already.",  # case and final mark ignored
                 "sampled reply, not greedy: not counted", "It is 41.", "no answer to look for"],
        "greedy": [True, False, True, True],
    }), tmp_path / "part-00000.parquet")
    assert contains_answer(rows, tmp_path) == 0.5  # a: yes, b: no; c has no answer
    assert contains_answer([SimpleNamespace(id="c", answer=None)], tmp_path) is None


def test_table_shows_pass_rate_contains_share_and_gap():
    result = {"suite": "reasoning_gym:x", "rows": 32, "gap": 0.03125,
              "student": {"greedy": 0.0, "contains": 0.09},
              "views": {"answer": {"greedy": 0.03125, "contains": None}}}
    text = table([result])
    assert "| `reasoning_gym:x` | 32 | 0.0% (9%) | 3.1% | **+3.1** |" in text, text
    assert text.splitlines()[0] == "| suite | eval rows | student | teacher + answer | gap |"
