"""Train stage: distil the cached teacher targets into the student.

Offline mode runs ``epochs`` passes over the targets; online mode calls
:func:`train_steps` for a few steps per iteration on a model that stays in
memory. Before any step the targets are checked against their rollouts
(same samples, same response token ids): training on misaligned targets would
silently teach garbage.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np

from opsd.config import TrainConfig
from opsd.pool import Policy
from opsd.training.batches import Example
from opsd.training.loop import NumericalError, Trainer, plan_batches
from opsd.training.state import has_resume_point, load_resume_point, save_resume_point
from stages.common import Artifact, StageContext, ids_hash
from storage.parquet import TRAIN_METRICS, read_table, write_table_atomic


class TargetMismatch(ValueError):
    """Teacher targets that do not belong to the rollouts they are trained with."""


def load_examples(rollouts: Artifact, targets: Artifact) -> list[Example]:
    r = read_table(
        rollouts.path,
        columns=["sample_id", "row_id", "prompt_ids", "response_ids", "behaviour_logprobs", "reward"],
    ).to_pydict()
    t = read_table(targets.path).to_pydict()
    index = {sid: i for i, sid in enumerate(t["sample_id"])}
    missing = [sid for sid in r["sample_id"] if sid not in index]
    if missing:
        raise TargetMismatch(
            f"{len(missing)} rollouts have no teacher targets in {targets.path} (e.g. {missing[0]}); "
            "rerun the teacher stage for these rollouts"
        )
    examples = []
    for i, sid in enumerate(r["sample_id"]):
        j = index[sid]
        resp = r["response_ids"][i]
        if t["response_hash"][j] != ids_hash(resp) or t["n_tokens"][j] != len(resp):
            raise TargetMismatch(
                f"teacher targets for {sid} were computed on different response token ids than the "
                f"rollout holds ({targets.path}); refusing to train on them — rerun the teacher stage"
            )
        if t.get("rollout_key") and t["rollout_key"][j] not in (None, rollouts.key):
            raise TargetMismatch(
                f"teacher targets for {sid} belong to rollout artifact {t['rollout_key'][j]}, "
                f"not {rollouts.key}"
            )
        k = len(t["topk_ids"][j][0]) if resp else 1
        examples.append(
            Example(
                sample_id=sid,
                prompt_ids=list(r["prompt_ids"][i]),
                response_ids=list(resp),
                behaviour_logp=np.asarray(r["behaviour_logprobs"][i], dtype=np.float32),
                teacher_logp=np.asarray(t["sampled_logprobs"][j], dtype=np.float32),
                topk_ids=np.asarray(t["topk_ids"][j], dtype=np.int32).reshape(len(resp), k),
                topk_logp=np.asarray(t["topk_logprobs"][j], dtype=np.float32).reshape(len(resp), k),
                tail=np.asarray(t["tail_mass"][j], dtype=np.float32),
                reward=float(r["reward"][i]) if r["reward"][i] is not None else 0.0,
                group=r["row_id"][i],
            )
        )
    # Empty responses carry no training signal (and no positions to score).
    return [e for e in examples if e.response_ids]


def save_checkpoint(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def run(
    cfg: TrainConfig,
    rollouts: Artifact,
    targets: Artifact,
    init: Policy,
    ctx: StageContext,
) -> dict:
    """Offline training: ``cfg.epochs`` passes; writes ``model/`` and ``metrics.parquet``."""
    import torch

    examples = load_examples(rollouts, targets)
    if not examples:
        raise TargetMismatch(f"no trainable examples in {rollouts.path}")
    torch.manual_seed(cfg.seed)
    model = ctx.pool.master(init)
    # Train a private copy: the pool's master of the initial policy stays the frozen
    # base model for the teacher and the 'before' evaluation.
    model = copy.deepcopy(model)
    tokenizer = ctx.pool.tokenizer(init)
    plan = plan_batches(len(examples), cfg)
    trainer = Trainer(model, cfg, tokenizer.pad_token_id, total_steps=len(plan))
    history: list[dict] = []
    resume_dir = ctx.out_dir / "resume"
    start = 0
    if has_resume_point(resume_dir):
        # A killed attempt left a complete resume point: continue exactly where it stopped.
        counters = load_resume_point(resume_dir, model, trainer.opt, trainer.sched)
        start, history = counters["step"], counters["history"]
        trainer.state.step = start
    t0 = time.perf_counter()
    bar = ctx.progress(len(plan), "train", "step")
    bar.update(start)
    try:
        for i in range(start, len(plan)):
            epoch, idx = plan[i]
            stats = trainer.step([examples[j] for j in idx], epoch)
            history.append(stats.as_dict())
            if ctx.on_metrics:
                ctx.on_metrics({k: v for k, v in stats.as_dict().items() if k != "step"}, stats.step)
            bar.set_postfix(loss=f"{stats.loss:.4f}", kl=f"{stats.kl:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
            bar.update(1)
            if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < len(plan):
                save_resume_point(resume_dir, model, trainer.opt, trainer.sched,
                                  {"step": i + 1, "history": history})
    except NumericalError as err:
        (ctx.out_dir / "nonfinite_batch.json").write_text(
            json.dumps({"step": err.step, "sample_ids": err.sample_ids, "error": str(err)}, indent=2)
        )
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    save_checkpoint(model, tokenizer, ctx.out_dir / "model")
    shutil.rmtree(resume_dir, ignore_errors=True)  # the artifact is the final model, not the resume point
    write_history(history, ctx.out_dir / "metrics.parquet")
    ctx.extras["trained_model"] = model
    tokens = sum(h["tokens"] for h in history)
    return {
        "steps": len(history),
        "epochs": cfg.epochs,
        "examples": len(examples),
        "tokens_trained": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "final_loss": history[-1]["loss"],
        "final_kl": history[-1]["kl"],
        "objective": cfg.objective,
        "temperature": cfg.temperature,
    }


def write_history(history: list[dict], path: Path) -> None:
    import pyarrow as pa

    cols = {name: [h.get(name) for h in history] for name in TRAIN_METRICS.names}
    write_table_atomic(pa.Table.from_pydict(cols, schema=TRAIN_METRICS), path)
