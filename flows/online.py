"""Online pipeline as one Prefect flow: the student is resampled every iteration.

dataset → evaluate(before, teacher) → [rollout_i → teacher_i → train_i → (evaluate_i)]* → evaluate(after)

Iteration artifacts are content-addressed and chained, so a rerun of the same
config (after a crash, or to extend it) skips completed iterations; see
``opsd.online``.
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from opsd import steps
from opsd.config import config_from_dict
from opsd.online import RUN_ONLY_ONLINE_KEYS, OnlineLoop, iteration_prompts
from opsd.pipeline import Pipeline, config_for_key
from opsd.pool import Policy
from opsd.reporting import finish_report
from flows.offline import TASK_OPTS, dataset_task, evaluate_task
from stages import dataset as dataset_stage
from stages import evaluate as evaluate_stage


@task(name="iteration", task_run_name="iteration-{iteration}", **TASK_OPTS)
def iteration_task(p: Pipeline, loop: OnlineLoop, iteration: int, policy: Policy, chain: list,
                   final: bool, t_start: float) -> tuple[str, Policy, dict | None]:
    cfg = p.cfg
    subset = iteration_prompts(loop.train_rows, cfg, iteration)
    teacher = loop.teacher_policy(policy.key, iteration)

    def prepared():
        loop._ensure_resident()
        if chain:
            loop._bring_to(chain[-1][0], chain)

    guided = cfg.rollout.guidance.enabled
    rollouts = steps.rollout_step(
        p, loop.rows, loop.data, policy, label=f"rollout/{iteration:03d}", iteration=iteration,
        subset=subset, teacher=teacher, before_run=prepared,
        engine=lambda: loop.res.generator,
        guide_model=(lambda: loop.res.teacher_model) if guided else None,
    )
    skills = steps.summarise_step(p, rollouts, policy, label=f"summarise/{iteration:03d}",
                                  model=lambda: loop.res.infer, before_run=prepared)
    exposure = loop.exposure(iteration)
    targets = steps.teacher_step(
        p, loop.rows, loop.data, rollouts, teacher, label=f"teacher/{iteration:03d}",
        skills=skills, exposure=exposure, scorer=lambda: loop.res.scorer, before_run=prepared,
    )
    loop.observe(iteration, rollouts)

    trcfg = config_for_key(cfg.train)
    trcfg.update({"online": config_for_key(cfg.online, drop=RUN_ONLY_ONLINE_KEYS),
                  "iteration": iteration,
                  # the LR schedule's length matters only for decaying schedules
                  "plan_steps": loop.plan_steps if cfg.train.schedule != "constant" else None})
    trained_fresh = {}

    def run_train(ctx):
        out = loop.train_iteration(rollouts, targets, iteration, chain, ctx)
        trained_fresh["yes"] = True
        return out

    art = p.stage(f"train/{iteration:03d}", "train", trcfg,
                  {"rollouts": rollouts.key, "targets": targets.key, "init": policy.key}, run_train)
    if trained_fresh:
        loop.after_train(art.key, iteration)
    chain.append((art.key, rollouts, targets))
    new_policy = Policy(art.key, loop.base.path, f"iter-{iteration}")  # weights live in memory

    ev = None
    every = cfg.online.eval_every
    if every and (iteration + 1) % every == 0 and not final:
        def run_eval(ctx):
            res = loop._ensure_resident()
            loop._bring_to(art.key, chain)
            eval_rows = [r for r in loop.rows if r.split == "eval"]
            out = evaluate_stage.run(cfg.eval, eval_rows, new_policy, ctx, label=f"iter-{iteration}",
                                     engine=res.generator)
            return out

        ecfg = config_for_key(cfg.eval, drop=("batch_size", "teacher_ceiling"))
        ecfg["with_context"] = None
        ev_art = p.stage(f"evaluate/iter-{iteration:03d}", "evaluate", ecfg,
                         {"dataset": loop.data.key, "policy": art.key}, run_eval)
        ev = {"iteration": iteration, "wall_seconds": time.perf_counter() - t_start,
              "greedy": ev_art.manifest.get("greedy_macro")}
        p.say(f"online: iteration {iteration} held-out greedy compliance "
              f"{(ev['greedy'] or 0) * 100:.1f}%")
    return art.key, new_policy, ev


@task(name="checkpoint", **TASK_OPTS)
def checkpoint_task(p: Pipeline, loop: OnlineLoop, chain: list) -> Policy:
    """The final student as its own artifact (a safetensors HF folder)."""
    from stages import train as train_stage

    final_key = chain[-1][0]

    def run(ctx):
        res = loop._ensure_resident()
        loop._bring_to(final_key, chain)
        train_stage.save_checkpoint(res.master, p.pool.tokenizer(loop.base), ctx.out_dir / "model")
        return {"iterations": len(chain), "steps": res.trainer.state.step}

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
    logger = get_run_logger()
    cfg = config_from_dict(config, "flow parameters")
    force = list(force or [])
    rows = dataset_stage.load(cfg.data)
    student, teacher = steps.resolve_policies(cfg)
    steps.preflight(cfg, rows, student, teacher)
    p = Pipeline(cfg, root, run_id, parent_run_id=parent_run_id, show_progress=show_progress,
                 logger=logger.info)
    p.start(prefect_flow_run_id=str(flow_run.get_id() or ""))
    try:
        t_start = time.perf_counter()
        data = dataset_task(p, rows, None, force)
        evals = {"before": evaluate_task(p, rows, data, student, "evaluate/before", False, force)}
        if cfg.eval.teacher_ceiling:
            evals["teacher"] = evaluate_task(p, rows, data, teacher, "evaluate/teacher", True, force)
        loop = OnlineLoop(p, rows, data, student, teacher)
        policy, chain, curve = student, [], []
        before = evals["before"].manifest.get("greedy_macro")
        curve.append({"iteration": -1, "wall_seconds": 0.0, "greedy": before})
        stop_at = cfg.online.stop_at
        for it in range(cfg.online.iterations):
            final = it == cfg.online.iterations - 1
            _, policy, ev = iteration_task(p, loop, it, policy, chain, final, t_start)
            if ev:
                curve.append(ev)
                if stop_at is not None and (ev["greedy"] or 0.0) >= stop_at:
                    p.say(f"online: held-out compliance {ev['greedy'] * 100:.1f}% ≥ stop_at "
                          f"{stop_at * 100:.1f}% after iteration {it}: stopping early")
                    break
        loop.wait_saved()  # the last resume point is complete before the run reports done
        policy = checkpoint_task(p, loop, chain)
        evals["after"] = evaluate_task(p, rows, data, policy, "evaluate/after", False, force)
        curve.append({"iteration": len(chain) - 1,
                      "wall_seconds": time.perf_counter() - t_start,
                      "greedy": evals["after"].manifest.get("greedy_macro")})
        (p.layout.run_dir(p.run_id) / "curve.json").write_text(json.dumps(curve, indent=1))
        extra = {"online.iterations": float(len(chain))}
        if loop.res is not None:  # vLLM weight loads: in place vs engine rebuilds
            extra.update({f"online.engine_loads.{k}": float(v) for k, v in loop.res.engine_loads.items()})
        last = chain[-1]
        return finish_report(p, evals, rollouts=last[1], targets=last[2], extra=extra)
    except BaseException as err:
        if "loop" in locals():
            try:
                loop.wait_saved()  # the writer thread does not outlive the flow
            except BaseException:
                pass  # the run's own error is the one to report
        p.finish("failed", error=f"{type(err).__name__}: {err}"[:2000])
        raise
