"""Train stage: distil the cached teacher targets into the student.

Offline mode runs ``epochs`` passes over the targets (:func:`run`, one process or
``train.world_size`` ranks under torchrun: :mod:`opsd.stages.train_worker`); online mode calls
:func:`online_steps` for a few steps per iteration on a model that stays in memory. Before any step the targets are checked against their rollouts
(same samples, same response token ids): training on misaligned targets would
silently teach garbage.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import logging

import numpy as np

from opsd.config import TrainConfig
from opsd.metrics import still_improving, trend
from opsd.device import resolve_dtype
from opsd.objectives import mixing
from opsd.objectives import registry as objective_registry
from opsd.pool import Policy
from opsd.training.batches import Example
from opsd.training.lora import merge_adapters
from opsd.training.trainer import NumericalError, Trainer, plan_batches
from opsd.training.state import has_resume_point, load_resume_point, save_resume_point
from opsd.stages.common import Artifact, StageContext, ids_hash
from opsd.stages import revise as revise_stage
from opsd.stages.rollout import teacher_sample_ids
from opsd.storage.parquet import NEGATIVE_FILE
from opsd.storage.parquet import (CONTEXTS_FILE, REFERENCE_FILE, TRAIN_METRICS, read_table,
                                  write_table_atomic)


log = logging.getLogger("opsd")


class TargetMismatch(ValueError):
    """Teacher targets that do not belong to the rollouts they are trained with."""


def load_examples(rollouts: Artifact, targets: Artifact, cfg: TrainConfig | None = None, *,
                  rows: list | None = None, tokenizer=None) -> list[Example]:
    """Examples of every rollout with its teacher targets, checked to belong together.

    With ``cfg`` also the per-sample inputs of the objective: GRPO advantages and SCOPE weights
    (computed over *all* samples, so a group split across batches is normalised as a whole),
    TRACE span masks (needs ``rows`` and the ``tokenizer``), and the teacher's context ids for
    live-teacher objectives (``contexts.parquet`` of the teacher artifact).
    """
    r = read_table(
        rollouts.path,
        columns=["sample_id", "row_id", "prompt_ids", "response_ids", "behaviour_logprobs", "reward",
                 "passed", "text"],
    ).to_pydict()
    t = read_table(targets.path).to_pydict()
    index = {sid: i for i, sid in enumerate(t["sample_id"])}
    missing = [sid for sid in r["sample_id"] if sid not in index]
    if missing:
        raise TargetMismatch(
            f"{len(missing)} rollouts have no teacher targets in {targets.path} (e.g. {missing[0]}); "
            "rerun the teacher stage for these rollouts"
        )
    contexts = None
    if cfg is not None and cfg.live_teacher:
        contexts = read_contexts(targets)
    reference = read_reference(targets)
    negative = read_negative(targets) if cfg is not None and cfg.rewards.credit == "cepo" else None
    teacher_written = teacher_sample_ids(rollouts.path)  # BRTS's kept teacher replies
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
        ctx_ids = None
        if contexts is not None:
            ctx_ids = contexts.get(t["context_hash"][j])
            if ctx_ids is None:
                raise TargetMismatch(f"context {t['context_hash'][j]} of {sid} is missing from "
                                     f"{targets.path}/contexts.parquet; rerun the teacher stage")
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
                passed=r["passed"][i],
                teacher_context_ids=ctx_ids,
                reference_logp=_reference_of(reference, sid, len(resp), targets),
                negative_logp=_negative_of(negative, sid, len(resp), targets),
                sample_weight=(cfg.weighting.teacher_reply if cfg is not None else 1.0)
                if sid in teacher_written else 1.0,
                teacher_written=sid in teacher_written,
            )
        )
    attach_group_stats(examples, cfg if cfg is not None else TrainConfig())
    if cfg is not None:
        if cfg.trace.enabled:
            attach_spans(examples, dict(zip(r["sample_id"], r["text"])), cfg, rows, tokenizer)
    # Empty responses carry no training signal (and no positions to score).
    return [e for e in examples if e.response_ids]


def read_reference(targets: Artifact) -> dict[str, list[float]] | None:
    """sample_id → G-OPD reference log-probs (``reference.parquet``, teacher.reference), or None."""
    f = targets.path / REFERENCE_FILE
    if not f.exists():
        return None
    c = read_table(f).to_pydict()
    return dict(zip(c["sample_id"], c["reference_logprobs"]))


def _reference_of(reference, sid: str, n: int, targets: Artifact) -> np.ndarray | None:
    if reference is None:
        return None
    lp = reference.get(sid)
    if lp is None or len(lp) != n:
        raise TargetMismatch(f"{targets.path}/{REFERENCE_FILE} has no reference log-probs of the "
                             f"{n} tokens of {sid}; rerun the teacher stage")
    return np.asarray(lp, dtype=np.float32)


def read_negative(targets: Artifact) -> dict[str, list[float]]:
    """sample_id → CEPO's wrong-answer teacher log-probs (``negative.parquet``)."""
    f = targets.path / NEGATIVE_FILE
    if not f.exists():
        raise TargetMismatch(f"{targets.path} has no {NEGATIVE_FILE}, which rewards.credit=cepo "
                             "needs: set teacher.negative_view and rerun the teacher stage")
    c = read_table(f, columns=["sample_id", "negative_logprobs"]).to_pydict()
    return dict(zip(c["sample_id"], c["negative_logprobs"]))


def _negative_of(negative, sid: str, n: int, targets: Artifact) -> np.ndarray | None:
    if negative is None:
        return None
    lp = negative.get(sid)
    if lp is None or len(lp) != n:
        raise TargetMismatch(f"{targets.path}/{NEGATIVE_FILE} has no negative log-probs of the "
                             f"{n} tokens of {sid}; rerun the teacher stage")
    return np.asarray(lp, dtype=np.float32)


def read_contexts(targets: Artifact) -> dict[str, list[int]]:
    """context_hash → teacher prompt ids, from the teacher artifact's ``contexts.parquet``."""
    f = targets.path / CONTEXTS_FILE
    if not f.exists():
        raise TargetMismatch(
            f"{targets.path} has no {CONTEXTS_FILE} (teacher context ids), which live-teacher "
            "objectives need; rerun the teacher stage with this version of opsd (--force teacher)"
        )
    c = read_table(f).to_pydict()
    return {h: list(ids) for h, ids in zip(c["context_hash"], c["context_ids"])}


def attach_group_stats(examples: list[Example], cfg: TrainConfig) -> None:
    """GRPO advantages and SCOPE weights, over all samples of the artifact (group = row)."""
    if not examples:
        return
    # a reply the teacher wrote (BRTS) is no member of the student's group: a group of its own
    groups = [e.group if not e.teacher_written else f"{e.group}#teacher:{e.sample_id}"
              for e in examples]
    adv = mixing.group_advantages([e.reward for e in examples], groups, cfg.rewards.advantage_eps)
    ppl_t = [mixing.sequence_log_ppl(e.teacher_logp) for e in examples]
    ppl_s = [mixing.sequence_log_ppl(e.behaviour_logp) for e in examples]  # the sampling student
    scope = mixing.scope_weights(ppl_t, ppl_s, [e.passed for e in examples], groups,
                                 cfg.rewards.scope_tau)
    for e, a, w in zip(examples, adv, scope):
        e.advantage, e.scope_weight = float(a), float(w)


def attach_spans(examples: list[Example], texts: dict[str, str], cfg: TrainConfig, rows, tokenizer) -> None:
    """TRACE key/error token masks from regexes over each reply's verified text."""
    if tokenizer is None:
        raise ValueError("trace spans need the tokenizer (to map text spans onto tokens)")
    by_id = {row.id: row for row in rows or []}
    tc = cfg.trace
    for e in examples:
        key_p, err_p = mixing.row_span_patterns(by_id.get(e.group), tc.key_patterns, tc.error_patterns,
                                                tc.key_from_verifier)
        if not e.response_ids or not (key_p or err_p):
            continue
        text = texts.get(e.sample_id) or ""
        offsets = mixing.token_char_offsets(tokenizer, e.response_ids)
        e.key_mask = mixing.spans_to_token_mask(offsets, mixing.char_spans(text, key_p))
        e.error_mask = mixing.spans_to_token_mask(offsets, mixing.char_spans(text, err_p))


def save_checkpoint(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """``state_dict``: the full weights of a sharded (FSDP) model, gathered on this rank."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)


def run(
    cfg: TrainConfig,
    rollouts: Artifact,
    targets: Artifact,
    init: Policy,
    ctx: StageContext,
    *,
    teacher: Policy | None = None,
    teacher_dtype: str = "bfloat16",
    teacher_batch_size: int = 32,
    rows: list | None = None,
    rollout_temperature: float | None = None,
) -> dict:
    """Offline training: ``cfg.epochs`` passes; writes ``model/`` and ``metrics.parquet``.

    ``teacher`` (and its dtype) is needed by live-teacher objectives, ``rows`` by TRACE spans.
    With ``cfg.world_size > 1`` the same loop runs data-parallel under torchrun
    (:mod:`opsd.training.distributed`) and this process waits for it.
    """
    if rollout_temperature not in (None, 0.0) and rollout_temperature != cfg.temperature:
        log.warning("train.temperature=%s differs from rollout.temperature=%s "
                    "(allow_temperature_mismatch)", cfg.temperature, rollout_temperature)
    if (cfg.temperature != 1.0 and not cfg.live_teacher
            and not objective_registry.get(cfg.objective).temperature_free):
        log.warning("train.temperature=%s: the cached teacher targets are temperature-1 log-probs; "
                    "only the student's logits are tempered", cfg.temperature)
    if cfg.world_size * cfg.nnodes > 1:
        from opsd.training import distributed

        pol = lambda p: {"key": p.key, "path": str(p.path), "label": p.label} if p else None  # noqa: E731
        spec = {
            "train": cfg.model_dump(mode="json"),
            "rollouts": {"key": rollouts.key, "path": str(rollouts.path)},
            "targets": {"key": targets.key, "path": str(targets.path)},
            "init": pol(init), "teacher": pol(teacher) if cfg.live_teacher else None,
            "teacher_dtype": teacher_dtype, "teacher_batch_size": teacher_batch_size,
            "out_dir": str(ctx.out_dir), "show_progress": ctx.show_progress,
            # the run's device type: CUDA ranks take cuda:LOCAL_RANK each
            "device": ctx.pool.device.type,
        }
        if cfg.nnodes > 1:
            log.info("train: %d nodes; on each other node run: %s", cfg.nnodes,
                     distributed.node_command(ctx.out_dir / "dist_spec.json"))
        distributed.launch(spec, ctx.out_dir, cfg.world_size, nnodes=cfg.nnodes,
                           rdzv_endpoint=cfg.rdzv_endpoint)
        history = read_table(ctx.out_dir / "metrics.parquet").to_pylist()
        if ctx.on_metrics:  # the ranks could not reach MLflow live: replay their curve
            for h in history:
                ctx.on_metrics({k: v for k, v in h.items() if k != "step" and v is not None}, h["step"])
        done = json.loads((ctx.out_dir / "train_summary.json").read_text())
        (ctx.out_dir / "train_summary.json").unlink()
        (ctx.out_dir / "dist_spec.json").unlink()
    else:
        done = train_local(cfg, rollouts, targets, init, ctx, teacher=teacher,
                           teacher_dtype=teacher_dtype, teacher_batch_size=teacher_batch_size,
                           rows=rows)
        history = done.pop("history")
    tokens = sum(h["tokens"] for h in history)
    seconds = done["seconds"]
    losses = [h["loss"] for h in history]
    return {
        "steps": len(history),
        "epochs": cfg.epochs if cfg.steps is None else len(history) * cfg.batch_size / max(1, done["examples"]),
        "step_budget": cfg.steps,
        # relative change of the loss over the last half of training (opsd.metrics.trend): a
        # run that stops while it still falls says so in its summary
        "loss_trend": trend(losses),
        "still_improving": still_improving(losses),
        "examples": done["examples"],
        "tokens_trained": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "final_loss": history[-1]["loss"],
        "final_kl": history[-1]["kl"],
        "objective": cfg.objective,
        "temperature": cfg.temperature,
        "rollout_temperature": rollout_temperature,
        "live_teacher": cfg.live_teacher,
        "world_size": cfg.world_size * cfg.nnodes,  # ranks in all
        "nnodes": cfg.nnodes,
        "sharding": cfg.sharding if cfg.world_size * cfg.nnodes > 1 else None,
        # the autocast actually used and how many micro-batches checkpointed their layers
        "autocast": done.get("autocast"),
        "activation_checkpointing": done.get("activation_checkpointing"),
        "init": done.get("init"),
        # parameters trained (train.trainable, or the adapters of train.lora) of all the model's
        # (with adapters: the base's and theirs)
        "trainable_params": done.get("trainable_params"),
        "params": done.get("params"),
        # train.lora: how many linear layers had adapters (folded into the saved weights)
        "lora_layers": done.get("lora_layers"),
        "wrapper": done.get("wrapper"),
        # world_size > 1: parameter / AdamW-moment elements and peak RSS of every rank
        "per_rank": done.get("per_rank"),
        "passed_fraction": done["passed_fraction"],
        "means": {k: float(np.mean([h[k] for h in history if h.get(k) is not None]))
                  for k in ("distill_fraction", "pg_fraction", "selected_fraction", "kl_weight",
                            "key_fraction", "error_fraction")
                  if any(h.get(k) is not None for h in history)},
    }


def budget_plan(n_examples: int, cfg: TrainConfig, groups: list[str] | None = None):
    """The optimiser steps to take, as (epoch, example indices): ``cfg.epochs`` passes, or with a
    step budget (``cfg.steps``) exactly that many steps over as many epochs as they need (the
    last one partial), each epoch shuffled as :func:`plan_batches` shuffles it."""
    if cfg.steps is None:
        return plan_batches(n_examples, cfg, groups)
    per_epoch = -(-n_examples // cfg.batch_size)
    epochs = -(-cfg.steps // per_epoch)
    return plan_batches(n_examples, cfg.model_copy(update={"epochs": epochs}), groups)[: cfg.steps]


def train_local(cfg: TrainConfig, rollouts: Artifact, targets: Artifact, init: Policy,
                ctx: StageContext, *, teacher: Policy | None = None,
                teacher_dtype: str = "bfloat16", teacher_batch_size: int = 32,
                rows: list | None = None, dist=None) -> dict:
    """The training loop of this process (the only one, or one rank of ``dist``).

    Only the main process writes: resume points, ``model/``, ``metrics.parquet``.
    """
    import torch

    main = dist is None or dist.is_main
    sharded = dist is not None and dist.sharded  # FSDP: gathering full state is collective
    tokenizer = ctx.pool.tokenizer(init)
    examples = load_examples(rollouts, targets, cfg, rows=rows, tokenizer=tokenizer)
    if not examples:
        raise TargetMismatch(f"no trainable examples in {rollouts.path}")
    torch.manual_seed(cfg.seed)
    teacher_model = None
    if cfg.live_teacher:
        if teacher is None:
            raise ValueError(f"objective {cfg.objective!r} needs the teacher policy (live teacher)")
        teacher_model = ctx.pool.inference(teacher, teacher_dtype)
    # Rollouts, targets and the 'before' evaluation are done: train the pool's master itself (a
    # later stage needing the base reloads it from disk) and drop its idle inference copies —
    # one fp32 model at the step's peak instead of two and no bf16 copy (−870 MB for
    # SmolLM2-135M). A rank's pool is its own (with fsdp the rank then holds only its shard).
    ctx.pool.drop_copies(init.key, keep=teacher_model)
    forward = None
    if sharded:
        # FSDP: built on the meta device and sharded; each rank reads only its rows of the
        # checkpoint, never the whole fp32 model
        model, forward = dist.load_sharded(init.path)
        init_how = "meta-device init, each rank read its shard"
    else:
        model = ctx.pool.take_master(init)
        init_how = "full checkpoint on every rank" if dist is not None else "full checkpoint"
    plan = budget_plan(len(examples), cfg, [e.group for e in examples])
    trainer = Trainer(model, cfg, tokenizer.pad_token_id, total_steps=len(plan),
                      teacher_model=teacher_model, teacher_batch_size=teacher_batch_size, dist=dist,
                      forward=forward)
    history: list[dict] = []
    resume_dir = ctx.out_dir / "resume"
    start = 0
    if has_resume_point(resume_dir):
        # A killed attempt left a complete resume point: continue exactly where it stopped.
        load = (lambda w, o: dist.load_full_state(model, trainer.opt, w, o)) if sharded else None
        counters = load_resume_point(resume_dir, model, trainer.opt, trainer.sched, load_state=load)
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
            if ctx.on_metrics and main:
                ctx.on_metrics({k: v for k, v in stats.as_dict().items() if k != "step"}, stats.step)
            bar.set_postfix(loss=f"{stats.loss:.4f}", kl=f"{stats.kl:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
            bar.update(1)
            if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < len(plan):
                full = {}
                if sharded:
                    full = {"weights": dist.full_state_dict(model),
                            "optimizer": dist.full_optimizer_state(model, trainer.opt)}
                if main:
                    # frozen weights are the init checkpoint's: only what trains is stored
                    frozen_part = not sharded and trainer.n_trainable < trainer.n_params
                    save_resume_point(resume_dir, model, trainer.opt, trainer.sched,
                                      {"step": i + 1, "history": history}, **full,
                                      trainable_only=frozen_part)
                if dist:
                    dist.barrier()  # no rank runs ahead of a resume point being written
    except NumericalError as err:
        if main:
            (ctx.out_dir / "nonfinite_batch.json").write_text(
                json.dumps({"step": err.step, "sample_ids": err.sample_ids, "error": str(err)}, indent=2)
            )
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    # fold the adapters into their layers: the checkpoint and the in-memory model every later
    # stage reads are plain ones of the base architecture
    merged = merge_adapters(model)
    passed = [e.passed for e in examples if e.passed is not None]
    summary = {"seconds": seconds, "examples": len(examples),
               "passed_fraction": sum(passed) / len(passed) if passed else None,
               "autocast": resolve_dtype(cfg.autocast, trainer.device) if cfg.autocast != "none"
               else "none", "activation_checkpointing": trainer.checkpointing.summary(),
               "init": init_how,
               "trainable_params": trainer.n_trainable, "params": trainer.n_params,
               "lora_layers": merged,
               # what reduced the gradients: DistributedDataParallel's reducer, or FSDP2
               "wrapper": type(trainer.forward).__name__ if trainer.forward is not None else None}
    if dist is not None:
        summary["per_rank"] = dist.per_rank(model, trainer.opt)
    weights = dist.full_state_dict(model) if sharded else None
    if main:
        save_checkpoint(model, tokenizer, ctx.out_dir / "model", weights)
        shutil.rmtree(resume_dir, ignore_errors=True)  # the artifact is the final model
        write_history(history, ctx.out_dir / "metrics.parquet")
        if dist is not None:
            (ctx.out_dir / "train_summary.json").write_text(json.dumps(summary))
    ctx.extras["trained_model"] = model
    return {**summary, "history": history}


def online_steps(trainer: Trainer, cfg: TrainConfig, rollouts: Artifact, targets: Artifact,
                 iteration: int, steps: int, *, rows: list | None = None, tokenizer=None,
                 revisions: Artifact | None = None) -> list[dict]:
    """The optimiser steps of one online iteration on that iteration's samples (a resident
    ``trainer``: its model, AdamW state and schedule carry over between iterations).

    Step ``s`` trains on samples ``order[s·B .. s·B + B)`` (wrapping around) of a permutation
    seeded by ``(train.seed, iteration)``, so a replay after a crash takes the same batches. The
    examples are loaded with ``cfg`` like offline ones: GRPO advantages (``advantage_eps``),
    SCOPE weights (``scope_tau``), the teacher's context ids for live-teacher objectives and
    TRACE spans (``rows``, ``tokenizer``).

    ``revisions`` (SD-Zero, ``train.reviser``): the iteration's revise artifact; step ``s`` also
    fits the reviser on up to ``B`` of its passing revisions, drawn the same way from a
    permutation of their own.
    """
    examples = load_examples(rollouts, targets, cfg, rows=rows, tokenizer=tokenizer)
    if not examples:
        raise TargetMismatch(f"no trainable examples in {rollouts.path}")
    order = np.random.default_rng([cfg.seed, iteration]).permutation(len(examples))
    revised = (revise_stage.revision_examples(revisions)
               if revisions is not None and cfg.reviser.enabled else [])
    rev_order = np.random.default_rng([cfg.seed, iteration, 1]).permutation(len(revised))
    bs = cfg.batch_size
    stats = []
    for s in range(steps):
        idx = [order[(s * bs + j) % len(order)] for j in range(min(bs, len(order)))]
        ridx = [rev_order[(s * bs + j) % len(revised)] for j in range(min(bs, len(revised)))]
        st = trainer.step([examples[j] for j in idx], epoch=iteration,
                          revisions=[revised[j] for j in ridx]).as_dict()
        st["iteration"] = iteration
        stats.append(st)
    return stats


def online_manifest(stats: list[dict], cfg: TrainConfig, iteration: int, seconds: float,
                    ctx: StageContext, trainer: Trainer | None = None) -> dict:
    """Write one online iteration's metrics (``metrics.parquet``, MLflow) and return its manifest."""
    if ctx.on_metrics:
        for st in stats:
            ctx.on_metrics({k: v for k, v in st.items() if k != "step"}, st["step"])
    write_history(stats, ctx.out_dir / "metrics.parquet")
    tokens = sum(s["tokens"] for s in stats)
    out = {
        "iteration": iteration, "steps": len(stats), "tokens_trained": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None, "final_loss": stats[-1]["loss"],
        "final_kl": stats[-1]["kl"], "objective": cfg.objective, "live_teacher": cfg.live_teacher,
        "activation_checkpointing": trainer.checkpointing.summary() if trainer else None,
    }
    if cfg.reviser.enabled:  # SD-Zero: the reviser term over the steps that had revisions
        rev = [(s["reviser_loss"], s["reviser_tokens"]) for s in stats if s.get("reviser_tokens")]
        n_rev = sum(n for _, n in rev)
        out["reviser_tokens"] = n_rev
        out["reviser_loss"] = sum(v * n for v, n in rev) / n_rev if n_rev else None
    return out


def write_history(history: list[dict], path: Path) -> None:
    import pyarrow as pa

    cols = {name: [h.get(name) for h in history] for name in TRAIN_METRICS.names}
    write_table_atomic(pa.Table.from_pydict(cols, schema=TRAIN_METRICS), path)
