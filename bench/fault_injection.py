"""Soak: SIGKILL pipeline runs at random moments of every stage, rerun each, compare with clean.

    python -m bench.fault_injection --kills 100              # the soak (hours on 2 cores)
    python -m bench.fault_injection --plan quick --kills 2 --json OUT  # the test suite's

Three pipelines on a tiny random model, each first run once uninterrupted (the reference):

* ``offline``: dataset, evaluate/before, evaluate/teacher, rollout, summarise, teacher, train,
  evaluate/after, retention/base, retention;
* ``online``: dataset, evaluations, then three iterations of rollout/teacher/train with a
  periodic evaluation, the final checkpoint and evaluate/after;
* ``dist``: the offline pipeline with ``train.world_size=2`` (two torchrun ranks).

Every kill gets a fresh artifact root: ``opsd run`` starts in its own process group, the script
waits until the target stage's staging folder appears (the stage has started), sleeps a random
fraction of that stage's clean duration and SIGKILLs the whole group (the run and Prefect's
server, like a node failure) — or, for ``dist``, one of the two torchrun ranks alone. Then
``opsd run`` runs again on the same root. Per kill it records where the kill landed, the damaged
or orphaned artifacts right after it and after the rerun (``opsd.storage.integrity``: must be
0), whether the rerun finished, reused every stage the killed run had completed, and ended with
the same artifacts as the reference (same keys; Parquet and JSON content equal apart from
timing fields, weights within float tolerance), and the seconds of recomputed work: the time
the killed attempt had spent in the interrupted stage plus the rerun's time for it, minus the
stage's clean duration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("offline", "online", "dist")
# 'quick': what tests/test_fault_injection.py runs (minutes); 'full': every stage of every mode
QUICK = [("offline", "rollout"), ("offline", "train")]
# fields that measure time or memory, not content: left out of the comparison
_VOLATILE = ("second", "per_s", "wall", "rss", "peak", "memory", "time")


def make_fixture(base: Path, model_dir: Path, mode: str = "offline", n_train: int = 16,
                 n_eval: int = 6) -> dict:
    """A dataset and a recipe whose stages each last a few seconds on a tiny model."""
    demos = [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 3
    data = base / "data.jsonl"
    with data.open("w") as f:
        for i in range(n_train + n_eval):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}, please answer briefly?",
                "privileged_context": {"demonstrations": demos},
                "verifier": {"type": "regex", "pattern": r"^\s*Sure"},
                "split": "train" if i < n_train else "eval", "task": "sure" if i % 2 else "other",
            }) + "\n")
    cfg = {
        "name": f"faults-{mode}",
        "model": {"name": str(model_dir)},
        "data": {"source": str(data)},
        "rollout": {"n": 2, "max_new_tokens": 16, "batch_size": 4, "shard_size": 3},
        "teacher": {"topk": 8, "shard_size": 6, "batch_size": 4},
        "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "save_every": 2},
        "eval": {"max_new_tokens": 16, "batch_size": 4},
        "tracking": {"log_model": False},
    }
    if mode == "offline":
        cfg["summarise"] = {"enabled": True, "max_new_tokens": 16}
        cfg["retention"] = {"enabled": True, "prompts": 8, "max_new_tokens": 12, "batch_size": 8}
    elif mode == "online":
        cfg["mode"] = "online"
        cfg["rollout"] = {"n": 2, "max_new_tokens": 16, "batch_size": 8}
        cfg["teacher"] = {"topk": 8, "batch_size": 8}
        cfg["online"] = {"iterations": 3, "prompts_per_iteration": 4, "steps_per_iteration": 2,
                         "eval_every": 2}
    elif mode == "dist":
        cfg["train"] = {**cfg["train"], "world_size": 2}
        cfg["eval"]["teacher_ceiling"] = False
    return cfg


def tiny_model(dest: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (converted once into the model cache)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from opsd.models import resolve_model_path

    if (dest / "config.json").exists():
        return dest
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


# ------------------------------------------------------------------ processes


def _env(workdir: Path) -> dict:
    # One code version for every run: a key must not change because a file was edited meanwhile.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "OPSD_CODE_VERSION": "fault-injection", "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}


def prefect_server(workdir: Path, env: dict) -> subprocess.Popen:
    """One Prefect server for every run of the soak, as a lab runs one (a kill takes a run and
    its node, not the server); saves each run the 10-20 s of starting a temporary one."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, cwd=workdir,
                            stdout=(workdir / "logs" / "prefect-server.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            env["PREFECT_API_URL"] = url
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None:
                break
            time.sleep(1)
    raise SystemExit(f"the Prefect server did not start; see {workdir}/logs/prefect-server.log")


def _start(recipe: Path, root: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root", str(root), "--no-progress"],
        cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a kill takes Prefect's server too
    )


def _run(recipe: Path, root: Path, log: Path, env: dict, timeout: float = 1800) -> tuple[int, float]:
    t0 = time.time()
    proc = _start(recipe, root, log, env)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        rc = rc if rc else -999
    return rc, time.time() - t0


# ------------------------------------------------------------------ catalog views


def _catalog(root: Path):
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    return Catalog(Layout.at(root))


def _last_run(root: Path) -> dict | None:
    runs = _catalog(root).runs() if (root / "catalog.duckdb").exists() else []
    return runs[-1] if runs else None


def _stages(root: Path, run_id: str) -> dict[str, dict]:
    return {s["label"]: s for s in _catalog(root).stages(run_id)}


def _problems(root: Path) -> dict:
    from opsd.storage.integrity import verify_root
    from opsd.storage.layout import Layout

    if not (root / "catalog.duckdb").exists():
        return {"damaged": [], "orphans": [], "unfinished": []}
    rep = verify_root(Layout.at(root))
    return {"damaged": [str(d) for d in rep.damaged], "orphans": [str(p) for p in rep.orphans],
            "unfinished": [f"{p} ({s})" for p, s in rep.unfinished]}


# ------------------------------------------------------------------ comparing artifacts


def _volatile(name: str) -> bool:
    return any(v in name.lower() for v in _VOLATILE)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not _volatile(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _same_file(a: Path, b: Path) -> str | None:
    """None when equal as content (timing fields aside), else why not."""
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".parquet":
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(a), pq.read_table(b)
        keep = [c for c in ta.column_names if not _volatile(c)]
        if set(keep) - set(tb.column_names):
            return "columns differ"
        if ta.select(keep).to_pylist() != tb.select(keep).to_pylist():
            return "rows differ"
        return None
    if a.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        wa, wb = load_file(str(a)), load_file(str(b))
        if wa.keys() != wb.keys():
            return "tensor names differ"
        bad = [k for k in wa if not torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5, rtol=1e-4)]
        return f"tensors differ ({bad[0]})" if bad else None
    if a.suffix == ".json":
        return None if _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text())) \
            else "JSON differs"
    return "bytes differ"


def compare(ref_root: Path, ref_run: str, root: Path, run_id: str) -> list[str]:
    """Differences between the final artifacts of two runs of the same recipe."""
    ref, got = _stages(ref_root, ref_run), _stages(root, run_id)
    diffs = []
    for label, s in ref.items():
        if label not in got:
            diffs.append(f"{label}: missing from the rerun")
            continue
        if got[label]["key"] != s["key"]:
            diffs.append(f"{label}: key {got[label]['key']} != {s['key']}")
            continue
        a = _catalog(ref_root).artifact(s["key"])
        b = _catalog(root).artifact(s["key"])
        if b is None:
            diffs.append(f"{label}: not complete in the catalog")
            continue
        pa_, pb = Path(a["path"]), Path(b["path"])
        for f in sorted(p for p in pa_.rglob("*") if p.is_file()):
            rel = f.relative_to(pa_)
            if rel.name == "manifest.json" or f.suffix == ".log":
                continue
            other = pb / rel
            why = "missing" if not other.exists() else _same_file(f, other)
            if why:
                diffs.append(f"{label}: {rel}: {why}")
        extra = {p.relative_to(pb) for p in pb.rglob("*") if p.is_file()} \
            - {p.relative_to(pa_) for p in pa_.rglob("*") if p.is_file()}
        diffs += [f"{label}: {rel}: not in the clean run's artifact" for rel in sorted(extra)]
    return diffs


# ------------------------------------------------------------------ one kill


@dataclass
class Kill:
    index: int
    mode: str
    target: str
    kind: str  # 'group' (the whole run) or 'rank' (one torchrun rank)
    outcome: str = ""  # killed | finished-before-kill | exit-N | never-started
    delay: float = 0.0
    landed: list[str] = field(default_factory=list)  # stages running when it struck
    after_kill: dict = field(default_factory=dict)
    rerun_rc: int | None = None
    rerun_seconds: float = 0.0
    not_reused: list[str] = field(default_factory=list)
    after_rerun: dict = field(default_factory=dict)
    stale_staging: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    recomputed_seconds: float = 0.0
    # per interrupted stage: seconds it had run when the kill struck, and the rerun's seconds
    in_stage_seconds: dict = field(default_factory=dict)
    rerun_stage_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.rerun_rc == 0 and not self.not_reused and not self.diffs
                and not self.after_kill.get("damaged") and not self.after_kill.get("orphans")
                and not any(self.after_rerun.values()) and not self.stale_staging)


@dataclass
class Reference:
    mode: str
    recipe: Path
    root: Path
    run_id: str
    stages: dict  # label → stage row (key, seconds, ...)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def strike(k: Kill, ref: Reference, base: Path, rng: random.Random, env: dict) -> Kill:
    """One kill and its rerun on a fresh root."""
    root = base / f"kill-{k.index:03d}-{k.mode}"
    shutil.rmtree(root, ignore_errors=True)
    log = base / "logs" / f"kill-{k.index:03d}.log"
    log.parent.mkdir(exist_ok=True)
    row = ref.stages[k.target]
    staging = root / "tmp" / f"{row['stage']}-{row['key']}"
    window = max(0.2, float(row["seconds"] or 1.0))
    from opsd.training.distributed import rank_pids

    proc = _start(ref.recipe, root, log, env)
    kill_at: datetime | None = None
    deadline = time.time() + 1200
    while proc.poll() is None and time.time() < deadline:
        if k.kind == "rank":
            ranks = rank_pids(proc.pid)
            if len(ranks) < 2:
                time.sleep(0.02)
                continue
            k.delay = rng.uniform(0, 0.9 * window)
            time.sleep(k.delay)
            ranks = rank_pids(proc.pid)
            if ranks and proc.poll() is None:
                kill_at = _utcnow()
                os.kill(rng.choice(ranks), signal.SIGKILL)  # one rank dies, the rest must notice
                k.outcome = "killed"
                try:
                    proc.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    k.outcome = "killed; run hung after the rank died"
                    proc.wait()
            break
        if staging.is_dir():
            k.delay = rng.uniform(0, window)
            time.sleep(k.delay)
            if proc.poll() is None:
                kill_at = _utcnow()
                os.killpg(proc.pid, signal.SIGKILL)  # like a node failure: everything at once
                proc.wait()
                k.outcome = "killed"
            break
        time.sleep(0.01)
    if not k.outcome:  # the stage ended before the kill was due: let the run end by itself
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        k.outcome = "finished-before-kill" if rc == 0 else f"exit-{rc}"
    killed_run = _last_run(root)
    spent: dict[str, float] = {}
    done_before: list[str] = []
    if killed_run is not None:
        for label, s in _stages(root, killed_run["run_id"]).items():
            if s["status"] in ("completed", "cached"):
                done_before.append(label)
            elif kill_at is not None and s["started_at"] is not None:
                k.landed.append(label)  # running (group kill) or failed (rank kill) when it struck
                spent[label] = max(0.0, (kill_at - s["started_at"]).total_seconds())
    k.after_kill = _problems(root)
    k.rerun_rc, k.rerun_seconds = _run(ref.recipe, root, log, env)
    final = _last_run(root)
    if final is None or k.rerun_rc != 0:
        return k
    got = _stages(root, final["run_id"])
    k.not_reused = [label for label in done_before if label in got and not got[label]["cached"]]
    for label, t_in in spent.items():
        clean = float(ref.stages.get(label, {}).get("seconds") or 0.0)
        again = float(got[label]["seconds"] or 0.0) if label in got and not got[label]["cached"] else 0.0
        k.in_stage_seconds[label] = round(t_in, 2)
        k.rerun_stage_seconds[label] = round(again, 2)
        k.recomputed_seconds += max(0.0, t_in + again - clean)
    k.after_rerun = _problems(root)
    k.stale_staging = sorted(p.name for p in (root / "tmp").iterdir()
                             if p.name != "locks" and not p.name.startswith("online-"))
    k.diffs = compare(ref.root, ref.run_id, root, final["run_id"])
    shutil.rmtree(root, ignore_errors=True)  # small disks: keep only failing roots
    return k


def reference(mode: str, base: Path, model: Path, env: dict) -> Reference:
    cfg = make_fixture(base, model, mode)
    recipe = base / f"recipe-{mode}.yaml"
    recipe.write_text(json.dumps(cfg))
    root = base / f"reference-{mode}"
    shutil.rmtree(root, ignore_errors=True)
    rc, secs = _run(recipe, root, base / "logs" / f"reference-{mode}.log", env)
    if rc != 0:
        raise SystemExit(f"the clean {mode} run failed (exit {rc}); see {base}/logs/reference-{mode}.log")
    run = _last_run(root)
    print(f"reference {mode}: {secs:.0f}s, {len(_stages(root, run['run_id']))} stages", flush=True)
    return Reference(mode, recipe, root, run["run_id"], _stages(root, run["run_id"]))


def plan(refs: dict[str, Reference], kills: int, which: str) -> list[tuple[str, str, str]]:
    """(mode, label, kind) of each kill: round-robin over every stage of every mode."""
    if which == "quick":
        targets = [(m, label, "group") for m, label in QUICK]
    elif which == "dist":
        targets = [("dist", "train", "rank")]
    else:
        targets = [(m, label, "group") for m in ("offline", "online") for label in refs[m].stages]
        targets.append(("dist", "train", "rank"))
    return [targets[i % len(targets)] for i in range(kills)]


# ------------------------------------------------------------------ report


def summary(kills: list[Kill]) -> dict:
    landed = [k for k in kills if k.outcome.startswith("killed")]
    rec = [k.recomputed_seconds for k in landed]
    return {
        "kills_planned": len(kills), "sigkills_sent": len(landed),
        "inside_target": sum(k.target in k.landed for k in landed),
        "reruns_finished": sum(k.rerun_rc == 0 for k in kills),
        "reruns_reused_all_completed": sum(k.rerun_rc == 0 and not k.not_reused for k in kills),
        "reruns_equal_to_clean": sum(k.rerun_rc == 0 and not k.diffs for k in kills),
        "damaged_after_kill": sum(len(k.after_kill.get("damaged", [])) for k in kills),
        "orphans_after_kill": sum(len(k.after_kill.get("orphans", [])) for k in kills),
        "damaged_or_orphaned_after_rerun": sum(len(k.after_rerun.get("damaged", []))
                                               + len(k.after_rerun.get("orphans", [])) for k in kills),
        "unfinished_after_rerun": sum(len(k.after_rerun.get("unfinished", [])) for k in kills),
        "stale_staging_after_rerun": sum(len(k.stale_staging) for k in kills),
        "recomputed_s_mean": statistics.mean(rec) if rec else 0.0,
        "recomputed_s_median": statistics.median(rec) if rec else 0.0,
        "recomputed_s_max": max(rec) if rec else 0.0,
        "ok": all(k.ok for k in kills),
    }


def table(kills: list[Kill]) -> str:
    lines = ["| mode | stage aimed at | SIGKILLs sent | landed in that stage | damaged/orphaned after kill | "
             "reruns finished | reused all completed | equal to clean run | damaged/orphaned/unfinished "
             "after rerun | recomputed s per kill (mean / max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[Kill]] = {}
    for k in kills:
        groups.setdefault((k.mode if k.kind == "group" else "dist (1 of 2 ranks)", k.target), []).append(k)
    for (mode, target), ks in groups.items():
        rec = [k.recomputed_seconds for k in ks if k.outcome.startswith("killed")] or [0.0]
        bad_kill = sum(len(k.after_kill.get("damaged", [])) + len(k.after_kill.get("orphans", [])) for k in ks)
        bad_rerun = sum(sum(len(v) for v in k.after_rerun.values()) + len(k.stale_staging) for k in ks)
        lines.append(
            f"| {mode} | {target} | {sum(k.outcome.startswith('killed') for k in ks)} of {len(ks)} | "
            f"{sum(k.target in k.landed for k in ks)} | {bad_kill} | "
            f"{sum(k.rerun_rc == 0 for k in ks)} | {sum(k.rerun_rc == 0 and not k.not_reused for k in ks)} | "
            f"{sum(k.rerun_rc == 0 and not k.diffs for k in ks)} | {bad_rerun} | "
            f"{statistics.mean(rec):.1f} / {max(rec):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100, help="kills in all (spread over the targets)")
    ap.add_argument("--plan", choices=("full", "quick", "dist"), default="full",
                    help="full: every stage of every mode; quick: the test suite's two kills; "
                    "dist: only one-of-two-ranks kills")
    ap.add_argument("--resume-from", type=Path, nargs="+", default=[],
                    help="--json reports of earlier soaks: their kills are kept and counted, the "
                    "new ones appended (numbered after them); with --kills 0 this only merges")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "faults-work")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "faults.json",
                    help="per-kill results and the summary")
    ap.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--prefect-server", action=argparse.BooleanOptionalAction, default=True,
                    help="one Prefect server for all runs (default) instead of a temporary one each")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = args.workdir.resolve()
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    env = _env(base)
    server = prefect_server(base, env) if args.prefect_server else None
    try:
        return _soak(args, base, env)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()


def _soak(args, base: Path, env: dict) -> int:
    model = tiny_model(base / "tiny")
    modes = {"quick": sorted({m for m, _ in QUICK}), "dist": ["dist"]}.get(args.plan, list(MODES))
    refs = {m: reference(m, base, model, env) for m in modes} if args.kills else {}
    rng = random.Random(args.seed)
    kills: list[Kill] = []
    for earlier in args.resume_from:
        kills += [Kill(**k) for k in json.loads(earlier.read_text())["kills"]]
    first = len(kills)
    t0 = time.time()
    todo = plan(refs, args.kills, args.plan) if args.kills else []
    for i, (mode, target, kind) in enumerate(todo, start=first):
        k = strike(Kill(i, mode, target, kind), refs[mode], base, rng, env)
        kills.append(k)
        print(f"[{time.time() - t0:7.0f}s] kill {i:3d} {mode:<7} {target:<18} {k.outcome:<22} "
              f"after {k.delay:5.2f}s in {','.join(k.landed) or '-':<24} rerun rc={k.rerun_rc} "
              f"{k.rerun_seconds:4.0f}s recomputed {k.recomputed_seconds:5.1f}s "
              f"{'ok' if k.ok else 'PROBLEM: ' + json.dumps({x: y for x, y in asdict(k).items() if x in ('not_reused', 'diffs', 'after_kill', 'after_rerun', 'stale_staging') and y})}",
              flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary(kills), "kills": [asdict(x) for x in kills]},
                                        indent=1, default=str))
    s = summary(kills)
    text = table(kills)
    print(text)
    print(json.dumps(s, indent=1))
    if args.table:
        args.table.write_text(text + "\n")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
