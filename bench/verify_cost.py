"""What checking an artifact before reuse costs: hashing its files against the catalog.

    python -m bench.verify_cost          # the quickstart's checkpoint (SmolLM2-135M, fp32)

Times :func:`opsd.storage.integrity.check_artifact` on a train artifact the size of the
quickstart's (SmolLM2-135M-Instruct's weights in fp32, 538 MB, plus its tokenizer), on Parquet
shards the size of its rollouts, and the stat-only pass that finds a missing or truncated file.
Each figure is the median of ``--repeat`` runs with the files in the page cache (a reuse right
after the run that wrote them); the first, cold read is reported separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _time(fn, repeat: int) -> tuple[float, float]:
    """(first call, median of the next ``repeat``) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opsd.models import resolve_model_path
    from opsd.storage.integrity import check_artifact
    from opsd.storage.layout import artifact_digest

    base = Path(tempfile.mkdtemp(prefix="opsd-verify-cost-"))
    try:
        train = base / "train"
        shutil.copytree(resolve_model_path("smollm2-135m-instruct"), train / "model")
        rollout = base / "rollout"
        rollout.mkdir()
        for i in range(4):  # 512 replies of ~48 tokens with their ids and log-probs, 4 shards
            n = 128
            pq.write_table(pa.table({
                "sample_id": [f"s{i}-{j}" for j in range(n)],
                "response_ids": [list(range(48))] * n,
                "behaviour_logprobs": [[-0.5] * 48] * n,
                "text": ["Sure thing! " * 8] * n,
            }), rollout / f"part-{i:05d}.parquet")
        rows = []
        for name, folder in (("train (SmolLM2-135M checkpoint)", train), ("rollout (4 shards)", rollout)):
            digest = artifact_digest(folder)
            record = {"key": name, "path": str(folder), "hash": digest.digest, "files": digest.files}
            os.sync()
            first, warm = _time(lambda: check_artifact(record), args.repeat)
            assert check_artifact(record) == []
            stat_only = {**record, "files": {k: [v[0] + 1, v[1]] for k, v in digest.files.items()}}
            _, sizes = _time(lambda: check_artifact(stat_only), args.repeat)
            rows.append((name, digest.nbytes, len(digest.files), first, warm, sizes))
        print("| artifact | bytes | files | first check s | check s (median) | GB/s | "
              "size-only pass s |")
        print("|---|---|---|---|---|---|---|")
        for name, nbytes, files, first, warm, sizes in rows:
            print(f"| {name} | {nbytes} | {files} | {first:.3f} | {warm:.3f} | "
                  f"{nbytes / warm / 1e9:.2f} | {sizes:.4f} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
