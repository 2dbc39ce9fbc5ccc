"""Every objective trains on the tiny random model: finite loss, the weights move, and the
objective's own inputs (advantages, spans, live teacher contexts) reach the loss.

The rollout and teacher stages run once (plain stage functions, no flow); each objective then
trains two optimiser steps on the same artifacts.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from opsd.config import PipelineConfig, TrainConfig
from opsd.stages import rollout as rollout_stage
from opsd.stages import teacher as teacher_stage
from opsd.stages import train as train_stage
from opsd.stages.common import Artifact, StageContext
from opsd.storage.parquet import CONTEXTS_FILE, read_table
from tests.helpers import train_on

def test_artifacts_have_both_verdicts_and_contexts(artifacts):
    r = read_table(artifacts["rollouts"].path, columns=["passed"]).to_pydict()
    assert 0 < sum(r["passed"]) < len(r["passed"])
    c = read_table(artifacts["targets"].path / CONTEXTS_FILE).to_pydict()
    t = read_table(artifacts["targets"].path, columns=["context_hash"]).to_pydict()
    assert set(t["context_hash"]) == set(c["context_hash"])  # deduplicated: one per distinct context
    assert len(c["context_hash"]) == len(set(c["context_hash"])) == 6


OBJECTIVES = {
    "forward_kl_topk": {"objective": "forward_kl_topk"},
    "forward_kl_topk_renorm_clip": {"objective": "forward_kl_topk",
                                    "divergence": {"topk_tail": "renorm", "clip": 0.5}},
    "reverse_kl_sampled_ratio": {"objective": "reverse_kl_sampled", "importance_ratio_clip": 2.0},
    "exopd": {"objective": "reverse_kl_sampled", "advantage": {"reward_scale": 2.0}},
    "vopd": {"objective": "reverse_kl_sampled", "advantage": {"baseline": "vopd"}},
    "reverse_kl_topk_teacher": {"objective": "reverse_kl_topk"},
    "reverse_kl_topk_student_live": {"objective": "reverse_kl_topk",
                                     "divergence": {"topk_support": "student", "topk": 8}},
    "forward_kl_topk_student_live": {"objective": "forward_kl_topk",
                                     "divergence": {"topk_support": "student", "topk_tail": "renorm"}},
    "jsd_live": {"objective": "jsd", "divergence": {"jsd_beta": 0.5}},
    "jsd_forward_clipped": {"objective": "jsd", "divergence": {"jsd_beta": 0.0, "clip": 0.05}},
    "nll": {"objective": "nll"},
    "grpo": {"objective": "none", "rewards": {"rl_weight": 1.0}},
    "grpo_mix": {"objective": "forward_kl_topk", "rewards": {"rl_weight": 1.0, "distill_weight": 0.5}},
    "srpo": {"objective": "forward_kl_topk", "rewards": {"routing": "srpo", "rl_weight": 1.0},
             "weighting": {"entropy": "teacher"}},
    "scope": {"objective": "forward_kl_topk", "rewards": {"routing": "scope", "rl_weight": 1.0}},
    "trace": {"objective": "forward_kl_topk", "rewards": {"rl_weight": 1.0},
              "trace": {"enabled": True, "key_patterns": ["[aeiou]"]}},
    "tip": {"objective": "forward_kl_topk", "selection": {"mode": "tip"}},
    "pw_opsd": {"objective": "forward_kl_topk", "weighting": {"position": "sigmoid", "skip_first": 1}},
    "iw_opd": {"objective": "reverse_kl_sampled", "weighting": {"position": "iw_opd"}},
    "entropy_student": {"objective": "forward_kl_topk", "weighting": {"entropy": "student"}},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_trains(artifacts, name):
    before = {k: v.clone() for k, v in artifacts["pool"].master(artifacts["policy"]).state_dict().items()}
    man, model = train_on(artifacts, name, **OBJECTIVES[name])
    assert man["steps"] == 2 and man["tokens_trained"] > 0
    assert np.isfinite(man["final_loss"]) and np.isfinite(man["final_kl"])
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 0, f"{name}: no weight changed"
    # the frozen base (teacher, 'before' evaluation) is untouched
    base = artifacts["pool"].master(artifacts["policy"]).state_dict()
    assert all(torch.equal(base[k], v) for k, v in before.items())
    assert man["live_teacher"] == TrainConfig.model_validate(OBJECTIVES[name]).live_teacher
    hist = read_table(artifacts["base"] / f"train-{name}" / "metrics.parquet").to_pydict()
    assert all(np.isfinite(hist["loss"]))
    if name == "trace":
        assert man["means"]["key_fraction"] > 0 and man["means"]["kl_weight"] > 0
    if name in ("srpo", "scope", "grpo_mix"):
        assert 0 < man["means"]["pg_fraction"] < 1 or name == "grpo_mix"
    if name == "tip":
        assert 0 < man["means"]["selected_fraction"] < 1


def test_group_stats_and_spans_reach_the_examples(artifacts, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = TrainConfig.model_validate({"trace": {"enabled": True, "error_patterns": ["[q]"]},
                                      "rewards": {"rl_weight": 1.0}})
    ex = train_stage.load_examples(artifacts["rollouts"], artifacts["targets"], cfg,
                                   rows=artifacts["rows"], tokenizer=tok)
    by_group: dict[str, list] = {}
    for e in ex:
        by_group.setdefault(e.group, []).append(e)
    for members in by_group.values():
        adv = np.array([m.advantage for m in members])
        rewards = np.array([m.reward for m in members])
        if rewards.std() > 0:
            assert abs(adv.sum()) < 1e-6 and np.all(np.sign(adv) == np.sign(rewards - rewards.mean()))
    texts = dict(zip(*read_table(artifacts["rollouts"].path, columns=["sample_id", "text"]).to_pydict().values()))
    checked = 0
    for e in ex:
        if e.key_mask is not None and e.key_mask.any():
            # the verifier's own pattern marks a key span: the reply's first token(s)
            assert e.key_mask[0] and e.passed
            marked = tok.decode([t for t, m in zip(e.response_ids, e.key_mask) if m])
            assert marked[0].isspace()
            checked += 1
        assert e.error_mask is not None or e.key_mask is None
        assert e.sample_id in texts
    assert checked > 0


def test_live_objective_without_contexts_is_refused(artifacts, tmp_path):

    from opsd.stages.train import TargetMismatch

    copy = tmp_path / "teacher"
    shutil.copytree(artifacts["targets"].path, copy)
    (copy / CONTEXTS_FILE).unlink()
    with pytest.raises(TargetMismatch, match="contexts.parquet"):
        train_stage.load_examples(artifacts["rollouts"], Artifact("x", copy),
                                  TrainConfig.model_validate({"objective": "jsd"}))


def test_sft_rollouts_come_from_the_teacher_with_student_prompts(artifacts, tmp_path):
    """rollout.sample_from=teacher: replies sampled from the teacher's privileged prompt, stored
    with the student's prompt ids; their behaviour log-probs are the teacher's own."""
    from opsd.context.render import student_ids
    from opsd.config import ContextConfig, RolloutConfig

    cfg = RolloutConfig(n=2, max_new_tokens=6, batch_size=8, dtype="float32", sample_from="teacher")
    ctx = StageContext(out_dir=tmp_path, pool=artifacts["pool"], show_progress=False)
    rows = artifacts["rows"][:3]
    rollout_stage.run(cfg, rows, artifacts["policy"], ctx, teacher=artifacts["policy"],
                      context=ContextConfig())
    r = read_table(tmp_path).to_pydict()
    tok = artifacts["pool"].tokenizer(artifacts["policy"])
    for row_id, p in zip(r["row_id"], r["prompt_ids"]):
        row = next(x for x in rows if x.id == row_id)
        assert list(p) == student_ids(tok, row)
    tcfg = PipelineConfig.model_validate({"teacher": {"topk": 3, "dtype": "float32"}}).teacher
    out = tmp_path / "t"
    out.mkdir()
    teacher_stage.run(tcfg, rows, Artifact("r", tmp_path), artifacts["policy"],
                      StageContext(out_dir=out, pool=artifacts["pool"], show_progress=False))
    t = read_table(out).to_pydict()
    for beh, tlp in zip(r["behaviour_logprobs"], t["sampled_logprobs"]):
        np.testing.assert_allclose(beh, tlp, atol=2e-4)


def test_attention_kernel_auto_switches_by_length_and_restores(tiny_model_dir):
    from opsd.models import load_model
    from opsd.training.loss import EAGER_MAX_LEN, attention_kernel

    model = load_model(Path(tiny_model_dir), torch.float32)
    model.config._attn_implementation = "sdpa"
    seen = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda mod, args: seen.append(model.config._attn_implementation))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    outs = {}
    for name, length in (("short", EAGER_MAX_LEN), ("long", EAGER_MAX_LEN + 1)):
        with attention_kernel(model, TrainConfig(), length):
            outs[name] = model.get_decoder()(input_ids=ids).last_hidden_state
    with attention_kernel(model, TrainConfig(attention="sdpa"), 8):
        model.get_decoder()(input_ids=ids)
    hook.remove()
    assert seen == ["eager", "sdpa", "sdpa"]
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(outs["short"], outs["long"], atol=1e-5, rtol=1e-4)  # same math


def test_trainable_trains_exactly_the_parameters_its_regex_finds(artifacts):
    before = {k: v.clone() for k, v in artifacts["pool"].master(artifacts["policy"]).state_dict().items()}
    man, model = train_on(artifacts, "trainable-mlp", objective="forward_kl_topk", trainable=r"\.mlp\.")
    after = model.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved == {k for k in before if ".mlp." in k}
    assert 0 < man["trainable_params"] < man["params"]
    assert man["trainable_params"] == sum(before[k].numel() for k in moved)


def test_a_trainable_regex_is_checked_before_anything_trains(artifacts):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="not a regular expression"):
        TrainConfig.model_validate({"trainable": "mlp("})
    # unset, it stays out of the train stage's key (artifacts trained before the field keep theirs)
    assert "trainable" not in TrainConfig().key_dict()
    assert TrainConfig(trainable="mlp").key_dict()["trainable"] == "mlp"
    with pytest.raises(ValueError, match="finds none of the model's .* parameter names"):
        train_on(artifacts, "trainable-none", trainable="no_such_block")
    assert not (artifacts["base"] / "train-trainable-none" / "model").exists()


def test_online_steps_load_examples_with_the_runs_config(artifacts):
    """Online iterations train on examples loaded with the run's train config (audit: the
    online loop loaded them without it, so scope_tau / advantage_eps fell back to defaults).
    Two SCOPE temperatures give different per-sample weights, hence different first steps."""
    from opsd.training.trainer import Trainer

    losses = []
    for tau in (0.05, 20.0):
        cfg = TrainConfig.model_validate({
            "objective": "forward_kl_topk", "batch_size": 12, "micro_batch_size": 12,
            "lr": 1e-3, "logit_chunk": 16, "autocast": "none",
            "rewards": {"routing": "scope", "rl_weight": 1.0, "scope_tau": tau}})
        model = copy.deepcopy(artifacts["pool"].master(artifacts["policy"]))
        pad = artifacts["pool"].tokenizer(artifacts["policy"]).pad_token_id
        trainer = Trainer(model, cfg, pad, total_steps=1)
        stats = train_stage.online_steps(trainer, cfg, artifacts["rollouts"], artifacts["targets"],
                                         iteration=0, steps=1)
        assert len(stats) == 1 and stats[0]["iteration"] == 0
        losses.append(stats[0]["loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)
