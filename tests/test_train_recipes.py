"""Every recipe in configs/ validates, shares the quickstart's upstream stages where it says so,
and its train section trains on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opsd.config import load_config
from opsd.flows.runner import config_for_key
from tests.helpers import train_on

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ["opsd", "lightning-opd", "pw-opsd", "tip", "srpo", "scope", "exopd", "vopd", "trace",
           "grpo", "sft", "mopd", "caopd"]
# no teacher guidance / replies sampled from the teacher / k = 4 rollouts per prompt (caopd)
OWN_ROLLOUTS = {"grpo", "sft", "mopd", "caopd"}
OWN_TEACHER = {"mopd", "caopd"}  # named routed teachers / the confidence view (tests/test_mopd.py,
                                 # tests/test_caopd.py run them end to end)


def test_every_recipe_exists_and_no_more():
    found = {p.stem for p in CONFIGS.glob("*.yaml")} - {"quickstart"}
    assert found == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_shares_upstream_stages(name):
    quick = load_config(CONFIGS / "quickstart.yaml")
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name and cfg.mode == "offline" and cfg.retention.enabled
    shared = ("model", "data", "eval") + (() if name in OWN_TEACHER else ("teacher",))
    for section in shared:
        assert config_for_key(getattr(cfg, section)) == config_for_key(getattr(quick, section)), section
    same_rollouts = config_for_key(cfg.rollout) == config_for_key(quick.rollout)
    assert same_rollouts == (name not in OWN_ROLLOUTS)
    assert cfg.train.temperature == cfg.rollout.temperature
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert "arXiv" in text  # the paper is named in the recipe


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_train_section_trains_on_the_tiny_model(artifacts, name):  # noqa: F811
    train = load_config(CONFIGS / f"{name}.yaml").train.model_dump()
    train.update(epochs=1, batch_size=12, micro_batch_size=6, lr=1e-3, logit_chunk=16, autocast="none")
    man, _ = train_on(artifacts, f"recipe-{name}", **train)
    assert man["steps"] == 2 and np.isfinite(man["final_loss"])
