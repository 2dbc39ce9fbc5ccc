"""Every bad input in bench/bad_inputs.py is refused before any compute: exit code 2, a message
naming the problem and the fix, and nothing written under the artifact root."""

from __future__ import annotations

import pytest

from bench.bad_inputs import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_refused_before_compute(case, tmp_path, tiny_model_dir):
    r = run_case(case, tmp_path, tiny_model_dir)
    assert r["exit_code"] == 2, r
    assert r["expected_fragment_found"], r
    assert r["written"] == [], r


def test_at_least_thirty_distinct_cases():
    assert len({c.name for c in CASES}) >= 30
