"""Offline pipeline (Lightning-OPD style) as one Prefect flow.

dataset → evaluate(before) → evaluate(teacher) → rollout → [confidence] → [summarise] → teacher
        → train → evaluate(after) → [retention]

Every evaluation also scores the ``eval.benchmarks`` panel (one evaluate stage per benchmark).

Rollouts are sampled once from the initial student and teacher targets are
precomputed once to Parquet; training then runs any number of epochs (and any
number of objective variants) over them. Each stage is a Prefect task; whether
it *computes* is decided by its content key in the catalog, so rerunning the
same config reuses everything and ``start_at`` reruns one stage and what
depends on it. The rollout and teacher stages run each missing shard as a task
of its own on the task runner ``runner.kind`` selects (flows/shards.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from opsd.flows.runner import Pipeline
from opsd.flows import steps
from opsd.flows.reporting import finish_report
from opsd.flows.shards import shard_runner
from opsd.stages import retention as retention_stage

# Caching is opsd's (content keys in the DuckDB catalog), not Prefect's: Prefect
# would otherwise pickle task results to disk, and artifacts here are Parquet,
# safetensors and JSON only.
TASK_OPTS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="dataset", **TASK_OPTS)
def dataset_task(p: Pipeline, rows, start_at, force):
    return steps.dataset_step(p, rows, force="dataset" in force,
                              require_cached=steps.upstream_of("dataset", start_at))


@task(name="evaluate", task_run_name="{label}", **TASK_OPTS)
def evaluate_task(p: Pipeline, rows, data, policy, label, with_context, force):
    return steps.evaluate_step(p, rows, data, policy, label=label, with_context=with_context,
                               force=label in force)


@task(name="benchmarks", task_run_name="benchmarks/{name}", **TASK_OPTS)
def benchmarks_task(p: Pipeline, policy, name, with_context, force):
    return steps.benchmark_steps(p, policy, name, with_context=with_context,
                                 force=f"evaluate/{name}" in force)


@task(name="rollout", **TASK_OPTS)
def rollout_task(p: Pipeline, rows, data, policy, teacher, start_at, force, shards=None):
    return steps.rollout_step(p, rows, data, policy, teacher=teacher, force="rollout" in force,
                              require_cached=steps.upstream_of("rollout", start_at),
                              shards=shards or shard_runner(p.cfg.runner))


@task(name="confidence", **TASK_OPTS)
def confidence_task(p: Pipeline, rollouts, policy):
    return steps.confidence_step(p, rollouts, policy)


@task(name="summarise", **TASK_OPTS)
def summarise_task(p: Pipeline, rollouts, policy):
    return steps.summarise_step(p, rollouts, policy)


@task(name="teacher", **TASK_OPTS)
def teacher_task(p: Pipeline, rows, data, rollouts, teacher, skills, start_at, force, shards=None):
    return steps.teacher_step(p, rows, data, rollouts, teacher, skills=skills,
                              force="teacher" in force,
                              require_cached=steps.upstream_of("teacher", start_at),
                              shards=shards or shard_runner(p.cfg.runner))


@task(name="train", **TASK_OPTS)
def train_task(p: Pipeline, rollouts, targets, init, start_at, force, teacher=None, rows=None):
    return steps.train_step(p, rollouts, targets, init, force="train" in force,
                            require_cached=steps.upstream_of("train", start_at),
                            teacher=teacher, rows=rows)


@task(name="retention", **TASK_OPTS)
def retention_task(p: Pipeline, base, policy, force, rows=None):
    return steps.retention_step(p, base, policy, force="retention" in force, rows=rows)


@flow(name="opsd-offline", persist_result=False, log_prints=True)
def offline_flow(
    config: dict,
    root: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    start_at: str | None = None,
    force: list[str] | None = None,
    show_progress: bool = True,
) -> dict:
    """Run (or resume, or partially rerun) the offline pipeline; returns headline metrics.

    ``start_at``: a stage name; stages before it must already be complete (reused).
    ``force``: stage labels to recompute even when complete (see ``steps.force_labels``).
    """
    force = list(force or [])
    p, rows, student, teacher = steps.open_run(
        config, root=root, run_id=run_id, parent_run_id=parent_run_id,
        show_progress=show_progress, logger=get_run_logger().info,
        flow_run_id=str(flow_run.get_id() or ""))
    cfg = p.cfg
    with p.failing_on_error():
        data = dataset_task(p, rows, start_at, force)
        evals = {"before": evaluate_task(p, rows, data, student, "evaluate/before", False, force)}
        panels = {"before": benchmarks_task(p, student, "before", False, force)}
        if cfg.eval.teacher_ceiling:
            evals["teacher"] = evaluate_task(p, rows, data, teacher, "evaluate/teacher", True, force)
            panels["teacher"] = benchmarks_task(p, teacher, "teacher", True, force)
        # One shard runner (runner.kind) for both sharded stages; closed before training, so
        # worker processes / a local Ray instance and their model copies are gone by then.
        with shard_runner(cfg.runner) as shards:
            rollouts = rollout_task(p, rows, data, student, teacher, start_at, force, shards)
            # CaOPD: stated confidences revised to the pass rates (the rollouts when off)
            rollouts = confidence_task(p, rollouts, student)
            skills = summarise_task(p, rollouts, student)
            targets = teacher_task(p, rows, data, rollouts, teacher, skills, start_at, force,
                                   shards)
        steps.release_engines(cfg)
        train_art, trained = train_task(p, rollouts, targets, student, start_at, force, teacher,
                                        rows)
        evals["after"] = evaluate_task(p, rows, data, trained, "evaluate/after", False, force)
        panels["after"] = benchmarks_task(p, trained, "after", False, force)
        retention = retention_task(p, student, trained, force, rows)
        return finish_report(p, evals, rollouts=rollouts, targets=targets,
                             extra={**retention_stage.headline(retention),
                                    **steps.train_headline(train_art)},
                             benchmarks=panels, notes=steps.train_notes(train_art))
