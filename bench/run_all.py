"""`make bench`: every benchmark script, one after another, each in its own process.

    python -m bench.run_all [--only storage rollout ...] [--skip vllm]

Each script prints its own table and writes JSON under bench/results/. They run
sequentially on purpose: these are 2-core machines, and two benchmarks side by side
would measure each other. vLLM runs only where it is importable (the `.[vllm]` extra).
Long end-to-end comparisons (bench.compare_recipes, bench.fault_injection) are run
separately: they take tens of minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

SUITE = {
    "storage": ["bench.bench_storage"],
    "rollout": ["bench.bench_rollout"],
    "teacher": ["bench.bench_teacher"],
    "objectives": ["bench.bench_objectives"],
    "vllm": ["bench.bench_vllm"],
    "bad_inputs": ["bench.bad_inputs"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SUITE), help="run just these")
    ap.add_argument("--skip", nargs="+", choices=sorted(SUITE), default=[], help="leave these out")
    args = ap.parse_args(argv)
    names = [n for n in (args.only or SUITE) if n not in args.skip]
    from bench.machine import warn_if_busy

    warn_if_busy()
    if "vllm" in names and importlib.util.find_spec("vllm") is None:
        print("vllm: skipped (not installed; see docs/vllm.md)")
        names.remove("vllm")
    failed, times = [], {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", *SUITE[name]])
        times[name] = time.perf_counter() - t0
        if rc:
            failed.append(name)
    print("\n" + "\n".join(f"{n:12s} {times[n]:7.1f} s  {'FAILED' if n in failed else 'ok'}"
                           for n in times))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
