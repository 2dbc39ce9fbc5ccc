"""Online pipeline as one Prefect flow: the student is resampled every iteration.

dataset → evaluate(before, teacher) → [rollout_i → teacher_i → train_i → (evaluate_i)]* → evaluate(after) → [retention]

Every evaluation also scores the ``eval.benchmarks`` panel (flows/offline.py's task).

Iteration artifacts are content-addressed and chained, so a rerun of the same
config (after a crash, or to extend it) skips completed iterations; the resident
student and its catch-up live in :mod:`opsd.flows.online_loop`.
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from opsd.flows import steps
from opsd.flows.offline import TASK_OPTS, benchmarks_task, dataset_task, evaluate_task
from opsd.flows.offline import retention_task
from opsd.stages import retention as retention_stage
from opsd.flows.online_loop import OnlineLoop, iteration_prompts
from opsd.flows.reporting import finish_report
from opsd.flows.runner import Pipeline
from opsd.pool import Policy
from opsd.stages import train as train_stage


@task(name="iteration", task_run_name="iteration-{iteration}", **TASK_OPTS)
def iteration_task(p: Pipeline, loop: OnlineLoop, iteration: int, policy: Policy,
                   final: bool, t_start: float) -> tuple[Policy, dict | None]:
    """rollout → [summarise] → teacher → [revise] → train (→ evaluate) of one iteration. Every
    stage that computes first catches the resident student up with the chain
    (``loop.current``); a reused one needs no model at all."""
    cfg = p.cfg
    subset = iteration_prompts(loop.train_rows, cfg, iteration)
    teacher = loop.teacher_policy(policy.key)
    guided = cfg.rollout.needs_teacher_model()
    rollouts = steps.rollout_step(
        p, loop.rows, loop.data, policy, label=f"rollout/{iteration:03d}", iteration=iteration,
        subset=subset, teacher=teacher, before_run=loop.current,
        engine=lambda: loop.current().generator,
        guide_model=(lambda: loop.current().teacher_model) if guided else None,
    )
    skills = steps.summarise_step(p, rollouts, policy, label=f"summarise/{iteration:03d}",
                                  model=lambda: loop.current().infer)
    targets = steps.teacher_step(
        p, loop.rows, loop.data, rollouts, teacher, label=f"teacher/{iteration:03d}",
        skills=skills, exposure=loop.exposure(iteration), scorer=lambda: loop.current().scorer,
    )
    loop.observe(iteration, rollouts)
    # SD-Zero: the current model as the reviser of this iteration's attempts (None when off)
    revisions = steps.revise_step(p, loop.rows, rollouts, policy, label=f"revise/{iteration:03d}",
                                  iteration=iteration, skills=skills, before_run=loop.current,
                                  engine=lambda: loop.current().generator)
    art, new_policy = steps.online_train_step(p, loop, rollouts, targets, policy, iteration,
                                              revisions=revisions)

    every = cfg.online.eval_every
    if not (every and (iteration + 1) % every == 0 and not final):
        return new_policy, None
    ev_art = steps.evaluate_step(p, loop.rows, loop.data, new_policy,
                                 label=f"evaluate/iter-{iteration:03d}",
                                 engine=lambda: loop.current().generator)
    ev = {"iteration": iteration, "wall_seconds": time.perf_counter() - t_start,
          "greedy": ev_art.manifest.get("greedy_macro")}
    p.say(f"online: iteration {iteration} held-out greedy compliance "
          f"{(ev['greedy'] or 0) * 100:.1f}%")
    return new_policy, ev


@task(name="checkpoint", **TASK_OPTS)
def checkpoint_task(p: Pipeline, loop: OnlineLoop) -> Policy:
    """The final student as its own artifact (a safetensors HF folder)."""
    final_key = loop.chain[-1][0]

    def run(ctx):
        res = loop.current()
        train_stage.save_checkpoint(res.master, p.pool.tokenizer(loop.base), ctx.out_dir / "model")
        return {"iterations": len(loop.chain), "steps": res.trainer.state.step}

    art = p.stage("checkpoint", "checkpoint", {}, {"train": final_key}, run,
                  after=lambda a, stage_run: steps.log_model(p, a, stage_run))
    policy = Policy(art.key, art.path / "model", "trained")
    if loop.res is not None and loop.res.state_key == final_key:
        p.pool.adopt(policy, loop.res.master)  # evaluate without reloading
    return policy


@flow(name="opsd-online", persist_result=False, log_prints=True)
def online_flow(
    config: dict,
    root: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    start_at: str | None = None,
    force: list[str] | None = None,
    show_progress: bool = True,
) -> dict:
    """Run (or resume) online OPSD; returns headline metrics.

    ``start_at``/``force`` are accepted for symmetry with the offline flow: online
    iterations always reuse completed ones and recompute the rest.
    """
    force = list(force or [])
    p, rows, student, teacher = steps.open_run(
        config, root=root, run_id=run_id, parent_run_id=parent_run_id,
        show_progress=show_progress, logger=get_run_logger().info,
        flow_run_id=str(flow_run.get_id() or ""))
    cfg = p.cfg
    loop: OnlineLoop | None = None
    # the resume point's writer thread does not outlive the flow, also when it fails
    with p.failing_on_error(cleanup=lambda: loop and loop.wait_saved()):
        t_start = time.perf_counter()
        data = dataset_task(p, rows, None, force)
        evals = {"before": evaluate_task(p, rows, data, student, "evaluate/before", False, force)}
        panels = {"before": benchmarks_task(p, student, "before", False, force)}
        if cfg.eval.teacher_ceiling:
            evals["teacher"] = evaluate_task(p, rows, data, teacher, "evaluate/teacher", True, force)
            panels["teacher"] = benchmarks_task(p, teacher, "teacher", True, force)
        loop = OnlineLoop(p, rows, data, student, teacher)
        policy = student
        curve = [{"iteration": -1, "wall_seconds": 0.0,
                  "greedy": evals["before"].manifest.get("greedy_macro")}]
        stop_at = cfg.online.stop_at
        for it in range(cfg.online.iterations):
            final = it == cfg.online.iterations - 1
            policy, ev = iteration_task(p, loop, it, policy, final, t_start)
            if ev:
                curve.append(ev)
                if stop_at is not None and (ev["greedy"] or 0.0) >= stop_at:
                    p.say(f"online: held-out compliance {ev['greedy'] * 100:.1f}% ≥ stop_at "
                          f"{stop_at * 100:.1f}% after iteration {it}: stopping early")
                    break
        loop.wait_saved()  # the last resume point is complete before the run reports done
        policy = checkpoint_task(p, loop)
        evals["after"] = evaluate_task(p, rows, data, policy, "evaluate/after", False, force)
        panels["after"] = benchmarks_task(p, policy, "after", False, force)
        retention = retention_task(p, student, policy, force, rows)
        curve.append({"iteration": len(loop.chain) - 1,
                      "wall_seconds": time.perf_counter() - t_start,
                      "greedy": evals["after"].manifest.get("greedy_macro")})
        (p.layout.run_dir(p.run_id) / "curve.json").write_text(json.dumps(curve, indent=1))
        extra = {"online.iterations": float(len(loop.chain)), **retention_stage.headline(retention)}
        if loop.res is not None:  # vLLM weight loads: in place vs engine rebuilds
            extra.update({f"online.engine_loads.{k}": float(v) for k, v in loop.res.engine_loads.items()})
        last = loop.chain[-1]
        return finish_report(p, evals, rollouts=last[1], targets=last[2], extra=extra,
                             benchmarks=panels)
