"""Data-parallel offline training on PyTorch's own engine (``torchrun`` + ``torch.distributed``).

With ``train.world_size > 1`` the train stage writes a small JSON spec and launches

    python -m torch.distributed.run --standalone --nproc_per_node N -m opsd.training.distributed SPEC

Every rank loads the same initial weights and the cached targets, walks the same batch plan, and
trains on its share of every optimiser batch (``batch[rank::N]``). Each rank scales its token
losses by ``1 / tokens in the whole batch``, so the all-reduced *sum* of the ranks' gradients is
exactly the one-process gradient; clipping and AdamW then run identically on every rank and the
replicas stay equal without broadcasting weights. Rank 0 alone writes resume points, metrics and
the checkpoint into the stage's temporary folder; the parent process publishes it as usual.

Gradients are reduced in flat buckets after the backward pass (what DDP's reducer does, without
overlapping it with backward): the decoder is called directly by the loss code (chunked LM head),
which a ``DistributedDataParallel`` wrapper's forward hooks would not see.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 16 * 1024 * 1024  # 64 MiB of fp32 per all-reduce


@dataclass
class DataParallel:
    """This process's rank in an initialised process group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world_size]

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the ranks (a missing gradient counts as zero)."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= BUCKET_ELEMENTS:
                self._reduce(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce(bucket)

    @staticmethod
    def _reduce(grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def min(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t)

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        dist.barrier()


def backend_for(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, work_dir: Path, world_size: int) -> None:
    """Run the workers with torchrun and wait; raise with the log's tail when any rank fails."""
    spec_path = work_dir / "dist_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = work_dir / "dist.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc_per_node={world_size}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "opsd.training.distributed", str(spec_path)]
    # Each rank gets an equal share of the cores (torchrun's default of 1 thread would idle them).
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"distributed training ({world_size} ranks) failed with exit code {rc}; "
                           f"log {log_path}:\n{tail}")


def main(spec_path: str) -> None:
    """Worker entry point (one per rank, started by torchrun)."""
    from opsd.config import TrainConfig
    from opsd.pool import ModelPool, Policy
    from stages.common import Artifact, StageContext
    from stages import train as train_stage

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig.model_validate(spec["train"])
    dist.init_process_group(backend_for(cfg.dist_backend), rank=rank, world_size=world)
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        dp = DataParallel(rank, world)
        art = lambda d: Artifact(d["key"], Path(d["path"]))  # noqa: E731
        pol = lambda d: Policy(d["key"], Path(d["path"]), d.get("label", "")) if d else None  # noqa: E731
        ctx = StageContext(Path(spec["out_dir"]), ModelPool(),
                           show_progress=spec.get("show_progress", True) and dp.is_main)
        train_stage.train_local(cfg, art(spec["rollouts"]), art(spec["targets"]), pol(spec["init"]),
                                ctx, teacher=pol(spec.get("teacher")),
                                teacher_dtype=spec.get("teacher_dtype", "bfloat16"),
                                teacher_batch_size=spec.get("teacher_batch_size", 32), dist=dp)
        dp.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
