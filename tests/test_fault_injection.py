"""The soak, short: SIGKILL an offline run inside its rollout stage and inside its train stage,
rerun each on the same root, and require what the long soak requires of every kill: 0 damaged
or orphaned artifacts, a rerun that finishes, reuses every stage the killed run had completed
and ends with the same artifacts as an uninterrupted run (same keys and content). The soak also
kills online runs and torchrun ranks.

The long run (`python -m bench.fault_injection --kills 100`, table in docs/reliability.md) and
this one are the same program; the test runs it as a subprocess (tests never import bench/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1800)
def test_killed_runs_resume_to_the_clean_result(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fault_injection", "--plan", "quick", "--kills", "2",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=1780)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    s = report["summary"]
    problems = [k for k in report["kills"] if not (
        k["rerun_rc"] == 0 and not k["not_reused"] and not k["diffs"]
        and not k["after_kill"]["damaged"] and not k["after_kill"]["orphans"]
        and not any(k["after_rerun"].values()) and not k["stale_staging"])]
    assert problems == [], json.dumps(problems, indent=1)
    assert s["kills"] == 2 and s["ok"], s
    assert s["landed"] >= 1, s  # a kill may miss the short rollout stage; train's must land
    assert proc.returncode == 0, proc.stdout[-2000:]
