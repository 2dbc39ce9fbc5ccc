"""The GPU benchmark script runs opsd's training loop end to end; here on the CPU with a
2-layer model (a smoke run: the figures it prints are not a benchmark)."""

from __future__ import annotations

import math

from bench import bench_gpu


def test_bench_gpu_smoke_on_cpu(tmp_path):
    res = bench_gpu.main(["--tiny", "--device", "cpu", "--batch", "4", "--micro-batch", "2",
                          "--prompt-len", "8", "--response-len", "16", "--steps", "2", "--warmup", "1",
                          "--peak-tflops", "1.0", "--out", str(tmp_path / "gpu.json")])
    assert res["tokens_per_s"] > 0 and math.isfinite(res["step_s"])
    assert 0 < res["mfu"] < 1 and (tmp_path / "gpu.json").exists()
