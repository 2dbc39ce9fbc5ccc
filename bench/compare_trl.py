"""opsd vs TRL's SDFT trainer on one rule, at matched settings: wall time to ≥ 31/32 compliance.

    python -m bench.compare_trl --root /tmp/trl-home             # TRL, opsd online, opsd offline
    python -m bench.compare_trl --parts trl --steps 30 --eval-every 5

The task (issue 6): SmolLM2-135M-Instruct learns "start every reply with 'Sure thing!'" from
three demonstration turns given to the teacher only (behaviours suite, rule ``sure-thing``:
64 train questions, 32 held-out). Shared settings: 4 prompts × 4 samples per step, 48 new
tokens, temperature 1.0, the teacher = the frozen initial model with the demonstrations in
context, top-k 100, AdamW lr 5e-5 constant, held-out greedy compliance without the
demonstrations (the opsd verifier, 48 new tokens) every ``--eval-every`` steps.

* **trl**: ``trl.experimental.sdft.SDFTTrainer`` as the issue specifies — fp32, gradient
  checkpointing, ``distillation_mode=topk_logits`` (student top-100, renormalised),
  ``distillation_alpha=0.5``, ``teacher_model_kind=base``,
  ``teacher_prompt_template="{privileged_context}{prompt}"`` with the demonstrations as text.
  The periodic evaluation runs in a callback (same generator and verifier as opsd's evaluate
  stage) and its time is taken out of the training clock.
* **online**: ``opsd run`` in online mode: each iteration samples 4 train questions × 4 from
  the current student, scores them with the frozen teacher (top-100 + tail, cached) and takes
  one optimiser step (forward KL on the teacher's top-100 + tail, opsd's default objective);
  bf16 autocast with fp32 master weights (opsd's default), no teacher guidance.
* **offline** / **offline-1ep**: the quickstart recipe on this rule (Lightning-OPD style):
  teacher-guided rollouts of all 64 questions × 4 from the initial student, teacher targets
  once, 2 epochs (32 steps of 16) / 1 epoch (16 steps), evaluated before and after.
* **offline-n2**: the same with 2 samples per question (128 guided rollouts) and 1 epoch
  (8 steps of 16): the offline run has a single evaluation at its end, so a smaller offline
  set is how its wall time to target is probed (TRL and online are evaluated every 5 steps).

All opsd parts checkpoint activations like the TRL run (``train.activation_checkpointing``),
and each part gets its own storage root under ``--root`` (nothing is reused across parts).
TRL's s/step is its median optimiser step (generation + teacher + update); opsd online's is its
median iteration (rollout + teacher + one step), leaving out the first iteration and those with
a periodic evaluation.

Each part runs in its own process (peak RSS = that process's VmHWM). "Wall to target" is the
work time (load, rollouts, teacher, training; evaluations excluded) until the first evaluation
at ≥ 31/32. Prints a table, writes ``bench/results/trl.json`` and the ``trl`` section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.docs import write_section  # noqa: E402

RULE = "sure-thing"
TARGET = 31 / 32
PARTS = ("trl", "online", "offline", "offline-1ep", "offline-n2")


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def demonstrations_text(row) -> str:
    """The rule's three demonstrations as one text (TRL's privileged_context is prepended to the
    question inside one user turn). Of the formats tried, "User:/Assistant:" transcripts are the
    one SmolLM2-135M follows (teacher 30/32 in fp32); bare turns or Q:/A: pairs give 0/32."""
    demos = row.privileged_context.demonstrations
    return "".join(f"User: {d.prompt}\nAssistant: {d.completion}\n\n" for d in demos) + "User: "


class Evaluator:
    """Held-out greedy compliance with opsd's generator and verifier (as the evaluate stage)."""

    def __init__(self, tokenizer, rows, max_new_tokens: int):
        from opsd.context.render import student_ids

        self.tok, self.rows, self.max_new = tokenizer, rows, max_new_tokens
        self.prompts = [student_ids(tokenizer, r) for r in rows]

    def __call__(self, model, prompts=None) -> float:
        import torch

        from opsd.backends.hf import HFGenerator, SamplingParams, cast_for_inference
        from opsd.data.verifiers import verify

        was_training = model.training
        copy_ = cast_for_inference(model, torch.bfloat16)  # eval dtype of opsd's evaluate stage
        gens = HFGenerator(copy_, self.tok, batch_size=64).generate(
            prompts or self.prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new))
        del copy_
        model.train(was_training)
        ok = [verify(self.rows[g.prompt_index].verifier,
                     self.tok.decode(g.response_ids, skip_special_tokens=True),
                     self.rows[g.prompt_index]).passed for g in gens]
        return sum(ok) / len(ok)


def run_trl(args) -> dict:
    """TRL SDFT with the issue's settings; evaluation every ``eval_every`` steps off the clock."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opsd.data import load_rows
    from opsd.models import load_model, load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    rows = load_rows(f"behaviours:{RULE}")
    train = [r for r in rows if r.split == "train"]
    held = [r for r in rows if r.split == "eval"]
    pi = demonstrations_text(train[0])
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r.prompt}], "privileged_context": pi}
                            for r in train])
    model = load_model(path, torch.float32)
    evaluator = Evaluator(tok, held, args.max_new_tokens)

    # the teacher's ceiling, in TRL's own teacher prompt format (one user turn: demos + question)
    t_prompts = [tok.apply_chat_template([{"role": "user", "content": pi + r.prompt}],
                                         add_generation_prompt=True, tokenize=True) for r in held]
    t_prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in t_prompts]
    teacher_score = evaluator(model, t_prompts)

    eval_s = 0.0
    curve: list[dict] = []
    step_s: list[float] = []

    class Clock(TrainerCallback):
        def __init__(self):
            self.t_step = None

        def on_step_begin(self, a, state, control, **kw):
            self.t_step = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, **kw):
            nonlocal eval_s
            step_s.append(time.perf_counter() - self.t_step)
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                t0 = time.perf_counter()
                score = evaluator(model)
                eval_s += time.perf_counter() - t0
                curve.append({"step": state.global_step, "greedy": score,
                              "work_s": time.perf_counter() - t_start - eval_s})
                print(f"trl: step {state.global_step} compliance {score * 32:.0f}/32 "
                      f"(work {curve[-1]['work_s']:.0f} s)", flush=True)

    out_dir = tempfile.mkdtemp(prefix="trl-sdft-")
    cfg = SDFTConfig(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=16,
        num_generations=4, max_completion_length=args.max_new_tokens, temperature=1.0,
        distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=100,
        teacher_model_kind="base", teacher_prompt_template="{privileged_context}{prompt}",
        learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=True, bf16=False, use_cpu=True, seed=0, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True,
    )
    t0 = time.perf_counter()
    before = evaluator(model)
    eval_s += time.perf_counter() - t0
    curve.append({"step": 0, "greedy": before, "work_s": time.perf_counter() - t_start - eval_s})
    trainer = SDFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    return {
        "part": "trl", "steps": len(step_s), "sec_per_step_median": statistics.median(step_s),
        "step_s": step_s, "train_s": sum(step_s), "work_s": time.perf_counter() - t_start - eval_s,
        "eval_s": eval_s, "curve": curve, "teacher": teacher_score, "before": before,
        "after": curve[-1]["greedy"], "peak_rss_mib": vm_hwm_mib(),
        "settings": {k: getattr(cfg, k) for k in (
            "per_device_train_batch_size", "num_generations", "max_completion_length",
            "temperature", "distillation_mode", "distillation_alpha", "distillation_topk",
            "teacher_model_kind", "learning_rate", "gradient_checkpointing", "bf16")},
    }


def _opsd_overrides(args, mode: str) -> list[str]:
    common = [f"data.source=behaviours:{RULE}", "rollout.n=4",
              f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0",
              "teacher.topk=100", "train.lr=5e-5", "train.schedule=constant", "train.batch_size=16",
              "train.micro_batch_size=16", f"eval.max_new_tokens={args.max_new_tokens}",
              "retention.enabled=false", f"name=trl-match-{mode}",
              # TRL's run checkpoints activations too (gradient_checkpointing=True)
              "train.activation_checkpointing=true"]
    common += list(args.set or [])  # a variant under study (--set KEY=VALUE)
    if mode == "online":
        return common + ["mode=online", "rollout.guidance.enabled=false",
                         "online.prompts_per_iteration=4", "online.steps_per_iteration=1",
                         f"online.iterations={args.steps}", f"online.eval_every={args.eval_every}"]
    if mode == "offline-n2":
        return common + ["rollout.n=2", "train.epochs=1"]
    return common + [f"train.epochs={2 if mode == 'offline' else 1}"]


def _stage_seconds(root: str, run_id: str) -> list[dict]:
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    layout = Layout.at(root)
    return Catalog(layout).stages(run_id)


def run_opsd(args, mode: str) -> dict:
    """One opsd run (offline or online flow) on this rule; work time excludes evaluations."""
    t_start = time.perf_counter()
    from opsd.flows.offline import offline_flow
    from opsd.flows.online import online_flow
    from opsd.config import load_config
    from opsd.flows.runner import new_run_id
    from opsd.storage.layout import Layout

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", _opsd_overrides(args, mode))
    run_id = f"{new_run_id()}-trl-{mode}"
    flow = online_flow if mode == "online" else offline_flow
    metrics = flow(config=cfg.model_dump(mode="json"), root=args.root, run_id=run_id,
                   show_progress=False)
    total = time.perf_counter() - t_start
    stages = _stage_seconds(args.root, run_id)
    # evaluations are off the clock anyway; any other reused stage would hide its cost
    cached = [s["label"] for s in stages if s["cached"] and not s["label"].startswith("evaluate/")]
    if [c for c in cached if c != "dataset"]:
        raise SystemExit(f"{mode}: stages {cached} were reused from an earlier run: use a fresh --root")
    evals = {s["label"]: float(s["seconds"] or 0) for s in stages if s["label"].startswith("evaluate/")}
    if mode == "online":
        curve_raw = json.loads((Layout.at(args.root).run_dir(run_id) / "curve.json").read_text())
        curve = []
        for c in curve_raw:
            # evaluations done by this point: before, teacher, and the iteration evals up to it
            done = evals.get("evaluate/before", 0) + evals.get("evaluate/teacher", 0) + sum(
                v for k, v in evals.items()
                if k.startswith("evaluate/iter-") and int(k.rsplit("-", 1)[1]) <= c["iteration"])
            step = (c["iteration"] + 1) * cfg.online.steps_per_iteration
            curve.append({"step": step, "greedy": c["greedy"],
                          "work_s": max(0.0, c["wall_seconds"] - done)})
        curve[-1]["work_s"] = curve[-2]["work_s"] if curve[-2]["step"] == curve[-1]["step"] else \
            curve[-1]["work_s"] - evals.get("evaluate/after", 0)
        steps = args.steps
    else:
        work = sum(float(s["seconds"] or 0) for s in stages
                   if s["label"] not in evals and s["label"] != "dataset")
        curve = [{"step": 0, "greedy": metrics.get("eval.before.greedy"), "work_s": 0.0},
                 {"step": None, "greedy": metrics.get("eval.after.greedy"), "work_s": work}]
        from opsd.storage.catalog import Catalog

        train_art = next((s for s in stages if s["label"] == "train"), None)
        cat = Catalog(Layout.at(args.root))
        steps = ((cat.artifact(train_art["key"]) or {}).get("manifest") or {}).get("steps") \
            if train_art else None
    train = next((s for s in stages if s["label"].startswith("train")), None)
    # online: wall time of each iteration (rollout start to the next rollout start), leaving out
    # the first (engine set-up) and those with a periodic evaluation — like TRL's median step
    starts = {int(s["label"].split("/")[1]): s["started_at"] for s in stages
              if s["label"].startswith("rollout/")}
    evaluated = {int(s["label"].rsplit("-", 1)[1]) for s in stages
                 if s["label"].startswith("evaluate/iter-")}
    iteration_s = [(starts[i + 1] - starts[i]).total_seconds() for i in sorted(starts)
                   if i + 1 in starts and i > 0 and i not in evaluated]
    return {
        "part": mode, "run_id": run_id, "steps": steps, "curve": curve,
        "before": metrics.get("eval.before.greedy"), "after": metrics.get("eval.after.greedy"),
        "teacher": metrics.get("eval.teacher.greedy"), "eval_s": sum(evals.values()),
        "work_s": total - sum(evals.values()), "process_s": total,
        "stage_seconds": {s["label"]: s["seconds"] for s in stages},
        "train_stage_s": train["seconds"] if train else None, "peak_rss_mib": vm_hwm_mib(),
        "overrides": _opsd_overrides(args, mode), "iteration_s": iteration_s,
        "sec_per_step_median": statistics.median(iteration_s) if iteration_s else None,
    }


def first_at_target(curve: list[dict]) -> dict | None:
    return next((c for c in curve if c["greedy"] is not None and c["greedy"] >= TARGET - 1e-9), None)


def sec_per_step(r: dict) -> float | None:
    if r["part"] == "trl":
        return r["sec_per_step_median"]
    if r["part"] == "online":  # median iteration: rollout + teacher + one optimiser step
        return r.get("sec_per_step_median")
    return None


def markdown(results: dict, meta: dict) -> str:
    trl = results.get("trl")
    cmds: dict[str, list[str]] = {}
    for name in PARTS:
        r = results.get(name)
        if r:
            key = f"`{r.get('command', meta.get('command', '?'))}` (finished {r.get('finished', '?')})"
            cmds.setdefault(key, []).append(name)
    lines = [
        f"{meta.get('machine', '')}, {meta.get('date', '')}; each part in its own process, one after "
        "another, nothing else running. Commands: " + "; ".join(
            f"{', '.join(names)}: {cmd}" for cmd, names in cmds.items()) + ".", "",
        "| run | compliance before → after (teacher) | steps | s / step | wall to ≥ 31/32 | "
        "wall total (no evals) | peak RSS |", "|---|---|---|---|---|---|---|"]
    for name in PARTS:
        r = results.get(name)
        if not r:
            continue
        hit = first_at_target(r["curve"])
        sps = sec_per_step(r)
        g = lambda v: "-" if v is None else f"{v * 32:.0f}/32"  # noqa: E731
        hit_s = f"{hit['work_s']:.0f} s (step {hit['step']})" if hit and hit["step"] else (
            f"{hit['work_s']:.0f} s" if hit else "not reached")
        lines.append(f"| {name} | {g(r['before'])} → {g(r['after'])} ({g(r['teacher'])}) | "
                     f"{r['steps']} | {'-' if sps is None else f'{sps:.2f}'} | {hit_s} | "
                     f"{r['work_s']:.0f} s | {r['peak_rss_mib'] / 1024:.2f} GiB |")
    if trl:
        lines += ["", "Ratios against TRL (targets: online ≤ 0.5× s/step and ≤ 0.5× wall to target, "
                  "peak RSS ≤ TRL's; offline ≤ 0.25× wall to target):", ""]
        t_hit = first_at_target(trl["curve"])
        for name in PARTS[1:]:
            r = results.get(name)
            if not r:
                continue
            hit = first_at_target(r["curve"])
            parts = []
            if sec_per_step(r) is not None:
                parts.append(f"s/step {sec_per_step(r) / trl['sec_per_step_median']:.2f}×")
            if hit and t_hit:
                parts.append(f"wall to target {hit['work_s'] / t_hit['work_s']:.2f}×")
            parts.append(f"peak RSS {r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}×")
            lines.append(f"- {name}: " + ", ".join(parts))
    lines += ["", "Compliance curve (work seconds, evaluations excluded):", "",
              "| run | step | work s | compliance |", "|---|---|---|---|"]
    for name in PARTS:
        for c in (results.get(name) or {}).get("curve", []):
            g = "-" if c["greedy"] is None else f"{c['greedy'] * 32:.0f}/32"
            lines.append(f"| {name} | {c['step'] if c['step'] is not None else 'end'} | "
                         f"{c['work_s']:.0f} | {g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--root", default=None, help="opsd storage root for the opsd parts (fresh)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trl.json"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs table from --out")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="extra opsd config override for the opsd parts (repeatable)")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        res = run_trl(args) if args.child == "trl" else run_opsd(args, args.child)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.root is None:
        args.root = tempfile.mkdtemp(prefix="opsd-trl-")
    from bench.machine import warn_if_busy

    warn_if_busy()
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    for part in [] if args.render else args.parts:
        print(f"\n=== {part} ===", flush=True)
        # a storage root per part: no part may reuse another's rollouts or targets
        cmd = [sys.executable, "-m", "bench.compare_trl", "--child", part,
               "--root", str(Path(args.root) / part),
               "--model", args.model, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
               "--max-new-tokens", str(args.max_new_tokens)]
        cmd += [f"--set={kv}" for kv in args.set or []]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        res = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0 or res is None:
            print(f"{part}: FAILED (exit {proc.returncode})", flush=True)
            continue
        res["command"] = "python -m bench.compare_trl " + " ".join(sys.argv[1:] if argv is None else argv)
        res["finished"] = time.strftime("%Y-%m-%d %H:%M")
        results[part] = res
        meta = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    meta = json.loads(out.read_text())["meta"] if out.exists() else {}
    text = markdown(results, meta)
    print("\n" + text)
    if not args.no_docs:
        write_section(ROOT / "docs" / "benchmarks.md", "trl", text,
                      "opsd vs TRL SDFT (`python -m bench.compare_trl`)")


if __name__ == "__main__":
    main()
