"""A killed train stage resumes from its last resume point to the model an uninterrupted run
trains: full training, a frozen part (``train.trainable``) and LoRA adapters. A resume point of a
partly frozen model stores only what trains (the rest is the init checkpoint's, read again)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opsd.config import TrainConfig
from opsd.stages import train as train_stage
from opsd.stages.common import StageContext
from opsd.training.state import load_resume_point, save_resume_point
from opsd.training.trainer import make_optimizer, select_trainable

SETTINGS = {
    "full": ({}, lambda key: True),
    "mlp-only": ({"trainable": r"\.mlp\."}, lambda key: ".mlp." in key),
    "lora": ({"lora": {"rank": 4, "alpha": 8}}, lambda key: key.endswith(("lora_A", "lora_B"))),
}


class _Killed(Exception):
    """Stands in for a kill: raised from the metrics callback between two resume points."""


def _logits(model, ids):
    with torch.no_grad():
        return model.float()(input_ids=ids).logits


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_killed_train_stage_resumes_to_the_uninterrupted_model(artifacts, setting):
    extra, stored = SETTINGS[setting]
    cfg = TrainConfig.model_validate({"epochs": 2, "batch_size": 12, "micro_batch_size": 6,
                                      "lr": 1e-3, "logit_chunk": 16, "autocast": "none",
                                      "save_every": 2, "objective": "forward_kl_topk", **extra})

    def attempt(out, on_metrics=None):
        ctx = StageContext(out_dir=out, pool=artifacts["pool"], show_progress=False,
                           on_metrics=on_metrics)
        man = train_stage.run(cfg, artifacts["rollouts"], artifacts["targets"], artifacts["policy"],
                              ctx, teacher=artifacts["policy"], teacher_dtype="float32",
                              rows=artifacts["rows"], rollout_temperature=1.0)
        return man, ctx.extras["trained_model"]

    straight_dir = artifacts["base"] / f"train-{setting}-straight"
    straight_dir.mkdir()
    straight_man, straight = attempt(straight_dir)
    assert straight_man["steps"] > 3

    def kill_at_step_3(metrics, step):  # after step 3, before its state could be saved
        if step == 3:
            raise _Killed

    out = artifacts["base"] / f"train-{setting}-killed"
    out.mkdir()
    with pytest.raises(_Killed):
        attempt(out, kill_at_step_3)
    saved = load_file(str(out / "resume" / "model.safetensors"))
    assert saved and all(stored(k) for k in saved), sorted(saved)[:5]
    if setting == "lora":
        assert len(saved) == 2 * straight_man["lora_layers"]  # A and B of every adapted layer

    trained_again = []
    resumed_man, resumed = attempt(out, lambda metrics, step: trained_again.append(step))
    # steps 1-2 come from the resume point (their history too), 3.. are trained again
    assert trained_again == list(range(3, straight_man["steps"] + 1))
    assert resumed_man["steps"] == straight_man["steps"]
    assert resumed_man["final_loss"] == pytest.approx(straight_man["final_loss"], rel=1e-5)
    assert resumed_man["trainable_params"] == straight_man["trainable_params"]
    assert not (out / "resume").exists()
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    torch.testing.assert_close(_logits(resumed, ids), _logits(straight, ids))


def test_a_resume_point_of_other_trainable_parameters_is_refused(tiny_model_dir, tmp_path):
    def setup(pattern):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
        select_trainable(model, pattern)
        return (model, *make_optimizer(model, TrainConfig(trainable=pattern), total_steps=4))

    model, opt, sched = setup(r"\.mlp\.")
    save_resume_point(tmp_path / "resume", model, opt, sched, {"step": 2, "history": []},
                      trainable_only=True)
    assert load_resume_point(tmp_path / "resume", *setup(r"\.mlp\."))["step"] == 2
    with pytest.raises(ValueError, match="trainable parameters of another model"):
        load_resume_point(tmp_path / "resume", *setup(r"\.self_attn\."))
