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

from opsd.training.distributed import rank_pids

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
    assert s["kills_planned"] == 2 and s["ok"], s
    assert s["sigkills_sent"] >= 1, s  # a kill may miss the short rollout stage; train's lands
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.timeout(900)
def test_a_killed_run_leaves_no_torchrun_rank_training(tiny_model_dir, tmp_path):
    """torchrun gives every rank a session of its own: SIGKILLing the run's process group used to
    leave both ranks training into the staging folder the rerun resumes from. They now end
    themselves within seconds of losing their run."""
    import signal
    import time

    from tests.helpers import tiny_config, write_dataset

    cfg = tiny_config(tiny_model_dir, write_dataset(tmp_path / "data.jsonl"))
    cfg["train"].update(world_size=2, epochs=20)  # long enough to be killed mid-training
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root",
                             str(tmp_path / "home"), "--no-progress"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ranks: list[int] = []
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and len(ranks) < 2:
        ranks = rank_pids(proc.pid)
        time.sleep(0.2)
    assert len(ranks) == 2, "the two ranks never started"
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its torchrun agent, as a node failure would
    proc.wait()
    t0 = time.time()
    while any(Path(f"/proc/{p}").exists() for p in ranks) and time.time() - t0 < 60:
        time.sleep(0.2)
    alive = [p for p in ranks if Path(f"/proc/{p}").exists()]
    for p in alive:  # do not leave them behind if the check fails
        os.kill(p, signal.SIGKILL)
    assert alive == [], f"ranks still training {time.time() - t0:.0f}s after their run was killed"
