"""SD-Zero (arXiv:2604.12002) pieces: the reviser term of the train step against a per-token
brute force, the revise stage's selection, contexts and verdicts on a tiny model, and the config
rules. The recipe end to end: tests/test_online_recipes.py::...[sd-zero]."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from opsd.config import ConfigError, ContextConfig, ReviserConfig, TrainConfig, load_config
from opsd.training.batches import Example
from opsd.training.trainer import Trainer
from tests.helpers import objectives_dataset, synthetic_examples

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "online" / "sd-zero.yaml"


def _revisions(vocab: int, seed: int = 1) -> list[Example]:
    """Passing revisions as the revise stage hands them over: two share their reviser context
    (two revisions of one attempt), one has its own; lengths differ."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, 7).tolist()
    prompts = [shared, shared, rng.integers(0, vocab, 5).tolist()]
    out = []
    for i, (prompt, n) in enumerate(zip(prompts, (4, 6, 3))):
        z = np.zeros(n, np.float32)
        out.append(Example(sample_id=f"a#{i}~r0", prompt_ids=prompt,
                           response_ids=rng.integers(0, vocab, n).tolist(),
                           behaviour_logp=np.full(n, -1.0, np.float32), teacher_logp=z,
                           topk_ids=np.zeros((n, 1), np.int32), topk_logp=np.zeros((n, 1), np.float32),
                           tail=z, group="a", passed=True))
    return out


def _brute_nll(model, revisions: list[Example]) -> torch.Tensor:
    """(1/|R|) Σ_ŷ Σ_t −log softmax(model(c + ŷ))[|c| − 1 + t, ŷ_t]: one plain forward per
    revision over the full vocabulary, temperature 1, token by token."""
    total, n = 0.0, 0
    for e in revisions:
        logits = model(torch.tensor([e.prompt_ids + e.response_ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        for t, tok in enumerate(e.response_ids):
            total = total - logp[len(e.prompt_ids) - 1 + t, tok]
        n += len(e.response_ids)
    return total / n


def _step_grads(model, cfg: TrainConfig, examples, revisions, pad_id):
    """One Trainer.step; returns (stats, the gradient it applied) — the optimiser's step is
    replaced by a copy of the gradients (clipping is off: max_grad_norm is huge)."""
    trainer = Trainer(model, cfg, pad_id, total_steps=1)
    grads = {}

    def capture():
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None})

    trainer.opt.step = capture
    return trainer.step(examples, revisions=revisions), grads


# the optimiser's step is swapped for a gradient capture (_step_grads): the scheduler notices
STEP_SWAPPED = "ignore:Seems like `optimizer.step\\(\\)` has been overridden"


@pytest.mark.filterwarnings(STEP_SWAPPED)
@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_reviser_term_is_weight_times_the_revisions_mean_nll(tiny_model_dir, weight):
    """step(main, revisions; w) − step(main; w = 0) = w · (1/|R|) Σ −log πθ(ŷ_t | c, ŷ_<t), in the
    loss and in every parameter's gradient, whatever the main objective and its temperature (the
    reviser term is plain NLL at temperature 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    base.config._attn_implementation = "eager"
    vocab = base.config.vocab_size
    main = synthetic_examples(4, prompt_len=6, resp_len=5, vocab=vocab, k=4)
    revisions = _revisions(vocab)
    common = dict(objective="reverse_kl_topk", temperature=2.0, allow_temperature_mismatch=True,
                  batch_size=4, micro_batch_size=2, logit_chunk=8, autocast="none",
                  attention="eager", max_grad_norm=1e9)
    on = TrainConfig(**common, reviser={"weight": weight})
    off = TrainConfig(**common)

    brute_model = copy.deepcopy(base)
    nll = _brute_nll(brute_model, revisions)
    nll.backward()
    want = {n: weight * p.grad for n, p in brute_model.named_parameters() if p.grad is not None}

    s_on, g_on = _step_grads(copy.deepcopy(base), on, main, revisions, tok.pad_token_id)
    s_off, g_off = _step_grads(copy.deepcopy(base), off, main, revisions, tok.pad_token_id)

    n_tokens = sum(len(e.response_ids) for e in revisions)
    assert s_on.extra["reviser_tokens"] == n_tokens == 13
    assert s_on.extra["reviser_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert s_on.loss - s_off.loss == pytest.approx(weight * nll.item(), rel=1e-5)
    assert "reviser_loss" not in s_off.extra  # off: no reviser term, no column
    assert s_on.kl == pytest.approx(s_off.kl, rel=1e-6)  # the main term is untouched
    assert set(want) <= set(g_on)
    for name, g in want.items():
        torch.testing.assert_close(g_on[name] - g_off[name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert any(float(g.abs().max()) > 1e-4 for g in want.values())  # a real gradient was compared


@pytest.mark.filterwarnings(STEP_SWAPPED)
def test_a_step_without_passing_revisions_trains_the_main_term_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    main = synthetic_examples(2, prompt_len=4, resp_len=3, vocab=base.config.vocab_size, k=4)
    common = dict(batch_size=2, micro_batch_size=2, autocast="none", max_grad_norm=1e9)
    s_on, g_on = _step_grads(copy.deepcopy(base), TrainConfig(**common, reviser={"weight": 1.0}),
                             main, [], tok.pad_token_id)
    s_off, g_off = _step_grads(copy.deepcopy(base), TrainConfig(**common), main, None,
                               tok.pad_token_id)
    assert s_on.extra["reviser_tokens"] == 0 and s_on.extra["reviser_loss"] is None
    assert s_on.loss == s_off.loss
    for name in g_off:
        assert torch.equal(g_on[name], g_off[name])


@pytest.fixture(scope="module")
def attempts(tiny_model_dir, tmp_path_factory):
    """Rollouts of the tiny model on 6 questions whose verifier (a reply starting with a space and
    a word character) about half the replies pass."""
    from opsd.config import PipelineConfig
    from opsd.data import load_rows
    from opsd.pool import ModelPool, base_policy
    from opsd.stages import rollout as rollout_stage
    from opsd.stages.common import Artifact, StageContext

    base = tmp_path_factory.mktemp("sd-zero")
    rows = load_rows(str(objectives_dataset(base / "data.jsonl")))
    cfg = PipelineConfig.model_validate({
        "model": {"name": str(tiny_model_dir)},
        "rollout": {"n": 2, "max_new_tokens": 6, "batch_size": 8, "dtype": "float32", "seed": 5},
    })
    pool = ModelPool()
    policy = base_policy(Path(tiny_model_dir))
    (base / "rollout").mkdir()
    rollout_stage.run(cfg.rollout, rows, policy, StageContext(base / "rollout", pool, False))
    return {"rows": rows, "rollouts": Artifact("rk", base / "rollout"), "policy": policy,
            "pool": pool, "base": base, "rollout_cfg": cfg.rollout}


@pytest.mark.parametrize("revise", ["failed", "all"])
def test_revise_stage_revises_the_selected_attempts_in_the_teacher_context(attempts, revise):
    from opsd.config import TeacherConfig
    from opsd.context.builders import dynamic_views
    from opsd.context.render import build_context, student_turn_ids, teacher_ids
    from opsd.stages import revise as revise_stage
    from opsd.stages.common import Artifact, StageContext
    from opsd.storage.parquet import read_table

    a = attempts
    teacher = TeacherConfig(context=ContextConfig(views=["attempt"]))
    roll = read_table(a["rollouts"].path).to_pydict()
    assert {True, False} <= set(roll["passed"])  # both verdicts occur: the selection matters
    out = a["base"] / f"revise-{revise}"
    out.mkdir()
    cfg = ReviserConfig(weight=1.0, revise=revise, n=2)
    man = revise_stage.run(cfg, a["rollout_cfg"], teacher, a["rows"], a["rollouts"], a["policy"],
                           StageContext(out, a["pool"], False), iteration=3,
                           extra_views=dynamic_views(roll, teacher.context))
    revs = read_table(out).to_pylist()
    chosen = [i for i, p in enumerate(roll["passed"]) if revise == "all" or not p]
    assert sorted(r["sample_id"] for r in revs) == sorted(
        f"{roll['sample_id'][i]}~r{j}" for i in chosen for j in range(2))
    tok = a["pool"].tokenizer(a["policy"])
    rows = {r.id: r for r in a["rows"]}
    by_id = {sid: i for i, sid in enumerate(roll["sample_id"])}
    for r in revs:
        i = by_id[r["attempt_id"]]
        row = rows[r["row_id"]]
        # the reviser context, built by hand: the row's turns after the attempt and its verdict
        view = {"attempt": roll["text"][i], "reward": f"{roll['reward'][i]:g}",
                "verdict": "correct" if roll["passed"][i] else "incorrect"}
        want = teacher_ids(tok, row, build_context(row, teacher.context, {"attempt": view}),
                           student_turn_ids(tok, row))
        assert r["prompt_ids"] == want
        assert r["attempt_passed"] == roll["passed"][i] and r["iteration"] == 3
        assert r["text"] == tok.decode(r["response_ids"], skip_special_tokens=True)
        assert r["passed"] == bool(re.match(r"^\s\w", r["text"]))  # the row's own verifier
        assert len(r["behaviour_logprobs"]) == r["n_tokens"] == len(r["response_ids"])
    assert man["revisions"] == len(revs) and man["revised"] == len(chosen)
    assert man["passing"] == sum(r["passed"] for r in revs)
    assert man["trainable_tokens"] == sum(r["n_tokens"] for r in revs if r["passed"])
    # what the reviser term trains on: the passing, non-empty revisions with their contexts
    ex = revise_stage.revision_examples(Artifact("rev", out))
    good = [r for r in revs if r["passed"] and r["n_tokens"]]
    assert [e.sample_id for e in ex] == [r["sample_id"] for r in good]
    assert all(e.prompt_ids == r["prompt_ids"] and e.response_ids == r["response_ids"]
               for e, r in zip(ex, good))


def test_revising_nothing_writes_an_empty_table(attempts, tmp_path):
    import pyarrow as pa

    from opsd.config import TeacherConfig
    from opsd.stages import revise as revise_stage
    from opsd.stages.common import Artifact, StageContext
    from opsd.storage.parquet import read_table, write_table_atomic

    a = attempts
    t = read_table(a["rollouts"].path)
    passed = t.set_column(t.schema.get_field_index("passed"), "passed",
                          pa.array([True] * t.num_rows))
    (tmp_path / "roll").mkdir()
    write_table_atomic(passed, tmp_path / "roll" / "part-00000.parquet")
    (tmp_path / "out").mkdir()
    man = revise_stage.run(ReviserConfig(weight=1.0), a["rollout_cfg"],
                           TeacherConfig(context=ContextConfig(views=["attempt"])), a["rows"],
                           Artifact("r", tmp_path / "roll"), a["policy"],
                           StageContext(tmp_path / "out", a["pool"], False))
    assert man["revised"] == man["revisions"] == 0 and man["pass_rate"] is None
    assert read_table(tmp_path / "out").num_rows == 0
    assert revise_stage.revision_examples(Artifact("x", tmp_path / "out")) == []


def test_recipe_and_config_rules():
    cfg = load_config(RECIPE)
    assert cfg.train.reviser.enabled and cfg.teacher.kind == "live"
    assert cfg.train.objective == "jsd" and cfg.train.divergence.jsd_beta == 1.0
    assert "attempt" in cfg.teacher.context.views
    # off (the default), the section stays out of every content key: older keys are kept
    assert "reviser" not in TrainConfig().key_dict() and "reviser" in cfg.train.key_dict()
    with pytest.raises(ConfigError, match="mode: online"):
        load_config(RECIPE, ["mode=offline", "teacher.kind=frozen"])
    with pytest.raises(ConfigError, match="'attempt'"):
        load_config(RECIPE, ["teacher.context.views=[solution]"])
    with pytest.raises(ConfigError, match="less than or equal"):
        load_config(RECIPE, ["train.reviser.n=65"])


def _replay_data(path: Path) -> Path:
    import json

    with path.open("w") as f:
        for i in range(8):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}?", "task": "t",
                # most replies of the random tiny model pass: revisions that pass are frequent
                "verifier": {"type": "regex", "pattern": r"^\s*\w"},
                "split": "train" if i < 6 else "eval"}) + "\n")
    return path


def _checkpoint(root: Path) -> dict:
    from safetensors.torch import load_file

    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    _, rows = Catalog(Layout.at(root)).query("SELECT path FROM artifacts WHERE stage = 'checkpoint'")
    return load_file(str(Path(rows[-1][0]) / "model" / "model.safetensors"))


@pytest.mark.timeout(420)
def test_an_extended_run_replays_the_reviser_from_the_stored_revisions(tiny_model_dir, tmp_path):
    """Extending a 2-iteration SD-Zero run to 3 (no resume point: the student is replayed from
    the cached artifacts) reuses the revisions and ends with the weights of an uninterrupted
    3-iteration run — the replayed steps trained the reviser on the same revisions."""
    from opsd.flows.online import online_flow
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout
    from tests.helpers import online_config

    data = _replay_data(tmp_path / "d.jsonl")
    cfg = online_config(
        tiny_model_dir, data, iterations=3,
        teacher={"kind": "live", "topk": 4, "context": {"views": ["attempt"]}},
        train={"objective": "jsd", "divergence": {"jsd_beta": 1.0}, "logit_chunk": 16,
               "reviser": {"weight": 1.0, "revise": "all", "n": 1}},
        online={"eval_every": 0, "resume_every": 0}, eval={"max_new_tokens": 4,
                                                           "teacher_ceiling": False},
        retention={"enabled": False})
    online_flow(config=cfg, root=str(tmp_path / "ref"), show_progress=False)
    short = {**cfg, "online": {**cfg["online"], "iterations": 2}}
    online_flow(config=short, root=str(tmp_path / "home"), show_progress=False)
    online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)

    cat = Catalog(Layout.at(tmp_path / "home"))
    stages = {s["label"]: s for s in cat.stages(cat.runs()[-1]["run_id"])}
    for i in range(2):
        assert stages[f"revise/{i:03d}"]["cached"] and stages[f"train/{i:03d}"]["cached"]
    assert not stages["revise/002"]["cached"] and not stages["train/002"]["cached"]
    replayed = [cat.artifact(stages[f"train/{i:03d}"]["key"])["manifest"] for i in range(2)]
    assert sum(m["reviser_tokens"] for m in replayed) > 0  # the replay had a reviser term to redo
    want, got = _checkpoint(tmp_path / "ref"), _checkpoint(tmp_path / "home")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-4)
