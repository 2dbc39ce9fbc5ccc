"""SIGKILL each stage mid-flight, rerun, and compare with an uninterrupted run.

The full sweep (many kills per stage, table in docs/reliability.md) is
`python -m bench.fault_injection --kills 10`; CI runs one kill per stage.
"""

from __future__ import annotations

import shutil

import pytest

from bench import fault_injection as fi


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    from opsd.flows.offline import offline_flow

    base = tmp_path_factory.mktemp("faults-ref")
    cfg = fi.make_fixture(base, tiny_model_dir)
    offline_flow(config=cfg, root=str(base / "home"), show_progress=False)
    yield fi.outputs(base / "home")
    shutil.rmtree(base, ignore_errors=True)  # small CI disks


@pytest.mark.timeout(900)
@pytest.mark.parametrize("label", fi.STAGES)
def test_kill_stage_and_resume_matches_clean_run(label, reference, tmp_path, tiny_model_dir):
    res = fi.run_stage_faults(tmp_path, tiny_model_dir, label, kills=1, seed=7, reference=reference)
    assert (res.corrupt, res.reruns_resumed, res.diffs) == ([], 1, []), res
