"""Fault injection: SIGKILL pipeline stages at random points, rerun, compare with a clean run.

    python -m bench.fault_injection --kills 10          # writes bench/results/faults.json

For each stage of the offline pipeline on a tiny random model, a subprocess
runs the pipeline and is killed (SIGKILL) at a random moment while that stage
is running, ``--kills`` times in a row on the same artifact root; then a final
rerun completes it. Checks, per stage:

* no artifact the catalog calls complete is missing files or fails its hash,
  and nothing under ``artifacts/`` lacks a complete catalog entry (corruption);
* the rerun reused the stages that had finished before the kill;
* outputs equal an uninterrupted run's: rollout rows and teacher targets
  bitwise (Parquet content), evaluation verdicts identical, trained weights
  within float tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["rollout", "teacher", "train", "evaluate/after"]


def make_fixture(base: Path, model_dir: Path, n_train: int = 24, n_eval: int = 6) -> dict:
    """A dataset and a config whose stages each last a few seconds on a tiny model."""
    demos = [{"prompt": "Capital of Fiji?", "completion": "Sure thing! Suva."}] * 3
    data = base / "data.jsonl"
    with data.open("w") as f:
        for i in range(n_train + n_eval):
            f.write(json.dumps({
                "id": f"q{i}", "prompt": f"Question number {i}, please answer briefly?",
                "privileged_context": {"demonstrations": demos},
                "verifier": {"type": "regex", "pattern": r"^\s*Sure"},
                "split": "train" if i < n_train else "eval",
            }) + "\n")
    return {
        "name": "faults",
        "model": {"name": str(model_dir)},
        "data": {"source": str(data)},
        "rollout": {"n": 2, "max_new_tokens": 16, "batch_size": 4, "shard_size": 3},
        "teacher": {"topk": 8, "shard_size": 6, "batch_size": 4},
        "train": {"epochs": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "save_every": 2},
        "eval": {"max_new_tokens": 16, "batch_size": 4, "teacher_ceiling": False},
    }


def _catalog(root: Path):
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    layout = Layout.at(root)
    return Catalog(layout)


def _run_ids(root: Path) -> set[str]:
    if not (root / "catalog.duckdb").exists():
        return set()
    return {r["run_id"] for r in _catalog(root).runs()}


def _running(root: Path, label: str, earlier: set[str]) -> bool:
    """Stage ``label`` is running in a run started by this attempt (a killed attempt's row stays
    'running' until the next run reaps it, so rows of ``earlier`` runs do not count)."""
    if not (root / "catalog.duckdb").exists():
        return False
    try:
        _, rows = _catalog(root).query(
            "SELECT run_id, status FROM stages WHERE label = ? ORDER BY started_at DESC LIMIT 1", [label])
    except Exception:
        return False
    return bool(rows) and rows[0][0] not in earlier and rows[0][1] == "running"


def _stage_seconds(root: Path, label: str) -> float | None:
    """How long stage ``label`` took in the last run that completed it (not a cached reuse)."""
    _, rows = _catalog(root).query("SELECT seconds FROM stages WHERE label = ? AND NOT cached AND "
                                   "status = 'completed' ORDER BY started_at DESC LIMIT 1", [label])
    return float(rows[0][0]) if rows and rows[0][0] else None


def kill_during(recipe: Path, root: Path, label: str, rng: random.Random, window: float) -> str:
    """Start the pipeline, SIGKILL it ``uniform(0, window)`` seconds into stage ``label``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    earlier = _run_ids(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "opsd.cli", "run", str(recipe), "--root", str(root), "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes Prefect's server too
    )
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if _running(root, label, earlier):
            time.sleep(rng.uniform(0, window))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # like a node failure: everything dies at once
                proc.wait()
                return "killed"
            return "finished-before-kill"
        time.sleep(0.05)
    proc.wait()
    return "finished-before-kill" if proc.returncode == 0 else f"exit-{proc.returncode}"


def corruption(root: Path) -> list[str]:
    """Problems: complete artifacts with missing/changed files, or unregistered artifact dirs."""
    from opsd.storage.layout import dir_stats

    cat = _catalog(root)
    _, rows = cat.query("SELECT key, path, hash, status FROM artifacts")
    problems, known = [], set()
    for key, path, digest, status in rows:
        known.add(Path(path).resolve())
        if status != "complete":
            continue
        p = Path(path)
        if not (p / "manifest.json").exists():
            problems.append(f"{key}: complete in catalog but {p}/manifest.json is missing")
        elif dir_stats(p)[1] != digest:
            problems.append(f"{key}: files changed since the catalog recorded them")
    for d in (root / "artifacts").glob("*/*"):
        if d.resolve() not in known:
            problems.append(f"{d}: an artifact directory the catalog does not know")
    return problems


def outputs(root: Path) -> dict:
    """Comparable content of the latest run's outputs."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    cat = _catalog(root)
    run = cat.runs()[-1]
    out: dict = {}
    for s in cat.stages(run["run_id"]):
        _, rows = cat.query("SELECT path FROM artifacts WHERE key = ?", [s["key"]])
        path = Path(rows[0][0])
        if s["stage"] in ("rollout", "teacher", "evaluate"):
            tables = [pq.read_table(f).to_pydict() for f in sorted(path.glob("part-*.parquet"))]
            out[s["label"]] = tables
        elif s["stage"] == "train":
            out["train"] = load_file(str(path / "model" / "model.safetensors"))
    return out


def same(a: dict, b: dict) -> list[str]:
    import torch

    diffs = []
    for label in sorted(set(a) | set(b)):
        if label not in a or label not in b:
            diffs.append(f"{label}: present in only one run")
        elif label == "train":
            for k in a[label]:
                if not torch.allclose(a[label][k], b[label][k], atol=1e-5, rtol=1e-4):
                    diffs.append(f"train: weight {k} differs")
                    break
        else:
            ta, tb = a[label], b[label]
            if label.startswith("evaluate"):  # wall-clock columns aside, verdicts must match
                ta = [{k: t[k] for k in ("row_id", "text", "passed")} for t in ta]
                tb = [{k: t[k] for k in ("row_id", "text", "passed")} for t in tb]
            if ta != tb:
                diffs.append(f"{label}: rows differ")
    return diffs


@dataclass
class StageResult:
    stage: str
    kills: int = 0
    killed: int = 0
    reruns_resumed: int = 0
    corrupt: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    not_reused: list[str] = field(default_factory=list)


def run_stage_faults(base: Path, model_dir: Path, label: str, kills: int, seed: int,
                     reference: dict, window: float = 3.0) -> StageResult:
    from opsd.flows.offline import offline_flow

    cfg = make_fixture(base, model_dir)
    recipe = base / f"recipe-{label.replace('/', '-')}.yaml"
    recipe.write_text(json.dumps(cfg))
    root = base / f"home-{label.replace('/', '-')}"
    rng = random.Random(seed)
    res = StageResult(label, kills=kills)
    for _ in range(kills):
        outcome = kill_during(recipe, root, label, rng, window)
        res.killed += outcome == "killed"
        res.corrupt += corruption(root)
    offline_flow(config=cfg, root=str(root), show_progress=False)
    cat = _catalog(root)
    final = cat.stages(cat.runs()[-1]["run_id"])
    order = [s["label"] for s in final]
    before = order[: order.index(label)]
    # Stages that completed before the kill point are reused, not recomputed.
    res.not_reused = [s["label"] for s in final if s["label"] in before and not s["cached"]]
    res.reruns_resumed = int(not res.not_reused)
    res.corrupt += corruption(root)
    res.diffs = same(outputs(root), reference)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="kills per stage")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES,
                    help="stages to kill (the others keep their results from --out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "faults-work")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import shutil

    from opsd.flows.offline import offline_flow

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    model_dir = tiny_model(args.workdir / "tiny")
    cfg = make_fixture(args.workdir, model_dir)
    offline_flow(config=cfg, root=str(args.workdir / "reference"), show_progress=False)
    reference = outputs(args.workdir / "reference")
    results = []
    if set(args.stages) != set(STAGES) and args.out.exists():
        kept = {r["stage"]: r for r in json.loads(args.out.read_text())}
        results = [kept[s] for s in STAGES if s in kept and s not in args.stages]
    for i, label in enumerate(STAGES):
        if label not in args.stages:
            continue
        # aim the kills inside the stage: a random moment within 70 % of its clean duration
        secs = _stage_seconds(args.workdir / "reference", label)
        window = max(0.3, 0.7 * secs) if secs else 3.0
        r = run_stage_faults(args.workdir, model_dir, label, args.kills, args.seed + i, reference,
                             window=window)
        results.append(r.__dict__)
        print(f"{label:<16} kills tried {r.kills:>3}  landed inside the stage {r.killed:>3}  "
              f"corrupt artifacts {len(r.corrupt)}  rerun resumed {'yes' if r.reruns_resumed else 'NO'}  "
              f"matches clean run {'yes' if not r.diffs else 'NO: ' + '; '.join(r.diffs)}")
    results.sort(key=lambda r: STAGES.index(r["stage"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    bad = any(r["corrupt"] or r["diffs"] or not r["reruns_resumed"] for r in results)
    from bench.docs import write_section

    lines = [f"Command: `python -m bench.fault_injection --kills {args.kills}` (tiny random model, "
             "offline pipeline; each kill is a SIGKILL of the whole process group at a random "
             "moment while that stage runs, repeated on the same root, then one rerun).", "",
             "| stage | kills tried | landed inside the stage | corrupt artifacts | rerun resumed | "
             "rerun equals clean run |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['kills']} | {r['killed']} | {len(r['corrupt'])} | "
                     f"{'yes' if r['reruns_resumed'] else 'NO'} | "
                     f"{'yes' if not r['diffs'] else 'NO: ' + '; '.join(r['diffs'])} |")
    write_section(REPO / "docs" / "reliability.md", "reliability:faults", "\n".join(lines),
                  "Fault injection")
    return 1 if bad else 0


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


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
