"""G-OPD's reference model (teacher.reference, Yang et al. 2026): scored in the teacher stage on
the student's prompt, it replaces the behaviour policy as πRef in the advantage of
reverse_kl_sampled; checked end to end through a real offline flow on two tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opsd.config import ConfigError, PipelineConfig, config_from_dict
from opsd.storage.catalog import Catalog
from opsd.storage.layout import Layout
from opsd.storage.parquet import REFERENCE_FILE, read_table
from tests.helpers import tiny_config, write_dataset


@pytest.fixture(scope="module")
def reference_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Another random model with the tiny model's tokenizer (a 'pre-RL base' of other weights)."""
    out = tmp_path_factory.mktemp("reference")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def _cfg(tiny_model_dir, data, reference, **train):
    cfg = tiny_config(tiny_model_dir, data)
    cfg["teacher"].update(reference={"name": str(reference)}, dtype="float32")
    cfg["train"].update(objective="reverse_kl_sampled", advantage={"reward_scale": 1.5}, **train)
    return cfg


def test_a_reference_without_an_advantage_it_could_change_is_refused(tiny_model_dir, tmp_path):
    base = _cfg(tiny_model_dir, tmp_path / "d.jsonl", tiny_model_dir)
    PipelineConfig.model_validate(base)
    for train in ({"advantage": {"reward_scale": 1.0}}, {"objective": "forward_kl_topk",
                                                         "advantage": {"reward_scale": 1.0}}):
        bad = {**base, "train": {**base["train"], **train}}
        with pytest.raises(ConfigError, match="teacher.reference"):
            config_from_dict(bad, "recipe")


@pytest.mark.timeout(300)
def test_reference_log_probs_are_the_reference_models_and_training_uses_them(
        tiny_model_dir, reference_dir, tmp_path):
    from opsd.flows.offline import offline_flow

    data = write_dataset(tmp_path / "data.jsonl")
    cfg = _cfg(tiny_model_dir, data, reference_dir)
    metrics = offline_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    assert np.isfinite(metrics["eval.after.greedy"])
    cat = Catalog(Layout.at(tmp_path / "home"))
    run = cat.runs()[-1]
    stages = {s["label"]: s for s in cat.stages(run["run_id"])}
    teacher = cat.artifact(stages["teacher"]["key"])
    assert teacher["manifest"]["reference"]  # the reference model's content key
    ref = read_table(Path(teacher["path"]) / REFERENCE_FILE).to_pydict()
    roll = read_table(Path(cat.artifact(stages["rollout"]["key"])["path"])).to_pydict()
    by_id = dict(zip(ref["sample_id"], ref["reference_logprobs"]))
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    checked = 0
    for sid, prompt, resp in zip(roll["sample_id"], roll["prompt_ids"], roll["response_ids"]):
        if not resp:
            continue
        with torch.no_grad():  # brute force: one plain forward of the reference on prompt + reply
            lp = model(torch.tensor([list(prompt) + list(resp)])).logits[0].float().log_softmax(-1)
        want = lp[len(prompt) - 1 : len(prompt) - 1 + len(resp)].gather(
            -1, torch.tensor(resp)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(by_id[sid]), want, atol=2e-4, rtol=0)
        checked += 1
    assert checked > 0
    # what training reads: every example carries them, and so does its batch
    from opsd.stages.common import Artifact
    from opsd.stages.train import load_examples
    from opsd.training.batches import collate

    examples = load_examples(Artifact(stages["rollout"]["key"], Path(cat.artifact(
        stages["rollout"]["key"])["path"])), Artifact(teacher["key"], Path(teacher["path"])))
    for e in examples:
        np.testing.assert_array_equal(e.reference_logp, np.float32(by_id[e.sample_id]))
    assert collate(examples[:3], 0).reference_logp_N.shape[0] == sum(
        len(e.response_ids) for e in examples[:3])
    # the same recipe without the reference computes another teacher artifact (its key changed)
    plain = tiny_config(tiny_model_dir, data)
    plain["teacher"]["dtype"] = "float32"
    plain["train"].update(objective="reverse_kl_sampled", advantage={"reward_scale": 1.5})
    offline_flow(config=plain, root=str(tmp_path / "home"), show_progress=False)
    again = {s["label"]: s for s in cat.stages(cat.runs()[-1]["run_id"])}
    assert again["rollout"]["key"] == stages["rollout"]["key"]
    assert again["teacher"]["key"] != stages["teacher"]["key"]
    assert again["train"]["key"] != stages["train"]["key"]
