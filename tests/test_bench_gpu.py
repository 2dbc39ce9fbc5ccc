"""The GPU benchmark scripts run end to end on the CPU with a 2-layer model (smoke runs: the
figures they print are not a benchmark). They run as the command a GPU machine runs, in a
subprocess: tests never import bench/."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# prefect, mlflow and duckdb are not on the GPU machine: importing any of them must fail there,
# and must not be needed here either
BLOCKED = ("prefect", "mlflow", "duckdb")
BLOCK = "import sys\nfor m in {b!r}: sys.modules[m] = None  # import m -> ImportError\n".format(
    b=BLOCKED)


def _run(args: list[str], script: str, tmp_path: Path, block: bool = False) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if block:
        code = BLOCK + (f"sys.argv = [{script!r}] + {args!r}\n"
                        f"import runpy\nrunpy.run_path({script!r}, run_name='__main__')\n"
                        f"assert not any(sys.modules.get(m) for m in {BLOCKED!r})\n")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["--tiny", "--device", "cpu", "--batch", "4", "--micro-batch", "2", "--prompt-len", "8",
          "--response-len", "16", "--steps", "2", "--warmup", "1", "--peak-tflops", "1.0",
          "--out", str(out)], "bench/bench_gpu.py", tmp_path)
    res = json.loads(out.read_text())
    assert res["tokens_per_s"] > 0 and math.isfinite(res["step_s"])
    assert 0 < res["mfu"] < 1


def test_gpu_pipeline_smoke_on_cpu_without_prefect_mlflow_duckdb(tmp_path):
    """bench/gpu_pipeline.py --tiny: every stage function on the CPU, with prefect, mlflow and
    duckdb unimportable (as on the lent GPU machine)."""
    out = tmp_path / "pipeline.json"
    stdout = _run(["--tiny", "--device", "cpu", "--out", str(out)], "bench/gpu_pipeline.py",
                  tmp_path, block=True)
    res = json.loads(out.read_text())
    stages = [r["stage"] for r in res["results"]]
    assert stages == ["rollout", "teacher", "train", "evaluate", "online iteration"]
    by = {r["stage"]: r for r in res["results"]}
    assert all(r["seconds"] > 0 and r["tokens"] > 0 for r in res["results"])
    assert 0 < by["teacher"]["mfu"] < 1 and 0 < by["train"]["mfu"] < 1
    assert by["rollout"]["decode_of_hbm_floor"] > 0 and by["train"]["steps"] == 4
    assert set(by["online iteration"]["seconds_by_part"]) == {"rollout", "teacher", "train_step",
                                                             "refresh_copy"}
    assert "| tiny | train |" in stdout and res["device"] == "cpu"
