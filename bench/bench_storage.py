"""Storage: bytes per response token of teacher targets, write throughput, DuckDB latency.

    python -m bench.bench_storage [--tokens 1000000]

Teacher targets are synthetic but shaped like real ones: top-k log-probs drawn
from a softmax over random logits (sorted, as top-k is), top-k ids from a
49,152-token vocabulary, responses of 48 tokens. Writes go through the same
schema and writer the teacher stage uses; queries go through the catalog's
views, as `opsd query` does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from opsd.storage.parquet import TEACHER, ROLLOUTS, write_table_atomic

V = 49_152
RESP = 48


def synthetic_teacher(n_samples: int, k: int, rng, rollout_key: str = "r" * 20) -> pa.Table:
    logits = rng.standard_normal((n_samples * RESP, max(k, 1) * 4)).astype(np.float32) * 3
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-lp, axis=1)[:, :k]
    ids = rng.integers(0, V, size=(n_samples * RESP, k), dtype=np.int32)
    tail = np.clip(1 - np.exp(top).sum(-1), 0, 1).astype(np.float32)
    cols = {name: [] for name in TEACHER.names}
    for s in range(n_samples):
        sl = slice(s * RESP, (s + 1) * RESP)
        cols["sample_id"].append(f"row{s // 2}#{s % 2}")
        cols["row_id"].append(f"row{s // 2}")
        cols["context_len"].append(200)
        cols["context_hash"].append("c" * 16)
        cols["response_hash"].append(f"{s:016x}")
        cols["n_tokens"].append(RESP)
        cols["sampled_logprobs"].append(top[sl, 0].tolist())
        cols["topk_ids"].append(ids[sl].tolist())
        cols["topk_logprobs"].append(top[sl].tolist())
        cols["tail_mass"].append(tail[sl].tolist())
        cols["views"].append("demonstrations")
        cols["teacher"].append("model-abc")
        cols["rollout_key"].append(rollout_key)
    return pa.Table.from_pydict(cols, schema=TEACHER)


def synthetic_rollouts(n_samples: int, rng) -> pa.Table:
    cols = {name: [] for name in ROLLOUTS.names}
    for s in range(n_samples):
        cols["sample_id"].append(f"row{s // 2}#{s % 2}")
        cols["row_id"].append(f"row{s // 2}")
        cols["sample_idx"].append(s % 2)
        cols["task"].append("t")
        cols["prompt_ids"].append(rng.integers(0, V, 40).tolist())
        cols["response_ids"].append(rng.integers(0, V, RESP).tolist())
        cols["behaviour_logprobs"].append((-rng.random(RESP)).tolist())
        cols["text"].append("x" * 200)
        cols["finish_reason"].append("stop")
        cols["reward"].append(1.0)
        cols["passed"].append(True)
        cols["feedback"].append("ok")
        cols["n_tokens"].append(RESP)
        cols["policy"].append("p")
        cols["iteration"].append(0)
        cols["guided_positions"].append([])
    return pa.Table.from_pydict(cols, schema=ROLLOUTS)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000, help="response tokens for the query test")
    ap.add_argument("--out", type=Path, default=Path("bench/results/storage.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="opsd-bench-storage-"))
    results: dict = {"bytes_per_token": {}, "write_tokens_per_s": {}}
    n = 2000  # samples → 96k tokens per measurement
    for k in (1, 20, 100):
        table = synthetic_teacher(n, k, rng)
        t0 = time.perf_counter()
        nbytes = write_table_atomic(table, work / f"k{k}.parquet")
        dt = time.perf_counter() - t0
        results["bytes_per_token"][k] = nbytes / (n * RESP)
        results["write_tokens_per_s"][k] = n * RESP / dt
        budget = 6 * k + 16
        print(f"k={k:>3}: {nbytes / (n * RESP):7.1f} bytes/token (budget 6k+16 = {budget}), "
              f"write {n * RESP / dt / 1e3:8.1f} k tokens/s")

    # DuckDB over ~1M response tokens of targets, through the catalog views.
    from opsd.storage.catalog import Catalog
    from opsd.storage.layout import Layout

    layout = Layout.at(work / "home")
    cat = Catalog(layout)
    per_file = 4000
    files = max(1, args.tokens // (per_file * RESP))
    for i in range(files):
        write_table_atomic(synthetic_teacher(per_file, 20, rng, f"t{i:04d}"), layout.artifacts / "teacher" / f"t{i:04d}" / "part-00000.parquet")
        write_table_atomic(synthetic_rollouts(per_file, rng), layout.artifacts / "rollout" / f"t{i:04d}" / "part-00000.parquet")
    # make the join match: teacher rows point at their rollout artifact
    cat.refresh_views()
    queries = {
        "count tokens": "SELECT sum(n_tokens) FROM teacher_targets",
        "gap by position": "SELECT pos, avg(teacher_logprob - student_logprob) FROM teacher_tokens "
                           "GROUP BY pos ORDER BY pos",
        "mean tail mass": "SELECT avg(list_avg(tail_mass)) FROM teacher_targets",
    }
    results["duckdb_seconds"] = {}
    total = cat.query("SELECT sum(n_tokens) FROM teacher_targets")[1][0][0]
    results["duckdb_tokens"] = int(total)
    for name, sql in queries.items():
        t0 = time.perf_counter()
        cat.query(sql)
        dt = time.perf_counter() - t0
        results["duckdb_seconds"][name] = dt
        print(f"duckdb over {total / 1e6:.2f} M tokens: {name:<16} {dt * 1000:8.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
