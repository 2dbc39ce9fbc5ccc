"""The summarise stage (Skill-SD lessons) on the tiny model's rollouts."""

from __future__ import annotations

from opsd.config import SummariseConfig
from opsd.context.builders import dynamic_views
from opsd.config import ContextConfig
from opsd.stages import summarise
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import read_table


def test_exclude_self_never_builds_a_samples_lessons_from_that_sample(artifacts, tmp_path):
    """Skill-SD: with exclude_self every sample's skills view comes from a summary whose sources
    do not include it (two folds per group, each summarised from the other)."""
    cfg = SummariseConfig(enabled=True, exclude_self=True, max_new_tokens=8, max_examples=4)
    ctx = StageContext(out_dir=tmp_path, pool=artifacts["pool"], show_progress=False)
    man = summarise.run(cfg, artifacts["rollouts"], artifacts["policy"], ctx, dtype="float32")
    t = read_table(tmp_path / "skills.parquet").to_pydict()
    assert man["groups"] == 2 and sorted(t["group"]) == ["t#fold0", "t#fold1"]
    for sources, users in zip(t["source_sample_ids"], t["used_for"]):
        assert sources and users and not set(sources) & set(users)
    r = read_table(artifacts["rollouts"].path, columns=["sample_id", "row_id", "task", "text",
                                                        "passed", "reward", "feedback"]).to_pydict()
    assert sorted(u for us in t["used_for"] for u in us) == sorted(r["sample_id"])
    skills = summarise.read_skills(Artifact("s", tmp_path))
    views = dynamic_views(r, ContextConfig(views=["skills"]), skills, "task")
    by_sample = {sid: g for g, us in zip(t["group"], t["used_for"]) for sid in us}
    lessons = dict(zip(t["group"], t["skills"]))
    for sid in r["sample_id"]:
        if lessons[by_sample[sid]]:
            assert views[sid]["skills"] == lessons[by_sample[sid]]
