"""Every bad or hostile input of bench/bad_inputs.py is refused before any compute: exit code 2,
a message naming the problem and the fix, and nothing written (no file created or changed in
the case's folder, no code from a hostile recipe or model run).

The cases live with the bench script; the test runs it as a program (tests never import
bench/), every case in one process (``--in-process``), and reads its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_every_bad_input_is_refused_before_compute(tmp_path):
    out = tmp_path / "bad_inputs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bad_inputs", "--in-process", "--no-docs", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=880)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = [r for r in results
              if not (r["exit_code"] == 2 and r["expected_fragment_found"] and not r["written"])]
    assert failed == [], json.dumps(failed, indent=1)
    assert len({r["case"] for r in results}) >= 70
    assert proc.returncode == 0, proc.stdout[-2000:]
