"""One end-to-end run on the real SmolLM2-135M-Instruct: a small slice of the quickstart task
must measurably teach the rule the teacher follows from its demonstrations."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_offline_opsd_teaches_sure_thing_on_smollm2(tmp_path, smol_path):
    from opsd.flows.offline import offline_flow

    cfg = {
        "name": "smoke",
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"source": "behaviours:sure-thing?train=24&eval=16"},
        "rollout": {"n": 2, "max_new_tokens": 24, "batch_size": 48,
                    "guidance": {"enabled": True}},
        "train": {"epochs": 2, "batch_size": 8, "micro_batch_size": 8, "lr": 5e-5},
        "eval": {"max_new_tokens": 24, "batch_size": 48},
        # a 540 MB copy of the weights into MLflow is tested on the tiny model instead
        "tracking": {"log_model": False},
    }
    m = offline_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    assert m["eval.teacher.greedy"] >= 0.75  # the demonstrations work on the teacher
    assert m["eval.before.greedy"] <= 0.25  # the student does not follow the rule by itself
    assert m["eval.after.greedy"] >= m["eval.before.greedy"] + 0.5, m
