"""torchrun worker entry point of the train stage: one process per rank.

``opsd.training.distributed.launch`` starts ``python -m torch.distributed.run ... -m
opsd.stages.train_worker SPEC``; each rank reads the JSON spec the train stage wrote and runs
:func:`opsd.stages.train.train_local` on its share of every batch. It lives with the train stage
(not in the library) because it calls the stage: the library never imports a stage.

With ``train.nnodes > 1`` every other node joins the stage's rendezvous with

    python -m opsd.stages.train_worker --node SPEC

which runs that node's ``train.world_size`` ranks under torchrun from the same spec (the spec,
the cached targets and the stage folder on a file system all nodes share).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from opsd.config import TrainConfig
from opsd.pool import ModelPool, Policy
from opsd.stages import train as train_stage
from opsd.stages.common import Artifact, StageContext
from opsd.training.distributed import DataParallel, backend_for, exit_when_orphaned, run_node


def rank_device(kind: str, local_rank: int) -> torch.device:
    """One GPU per rank on CUDA (``cuda:LOCAL_RANK``); CPU ranks share the host."""
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(spec_path: str) -> None:
    """Worker entry point (one per rank, started by torchrun)."""
    spec = json.loads(Path(spec_path).read_text())
    exit_when_orphaned(spec.get("owner"))  # a killed run must not leave its ranks training
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(spec.get("device", "cpu"), int(os.environ.get("LOCAL_RANK", "0")))
    cfg = TrainConfig.model_validate(spec["train"])
    torch.distributed.init_process_group(backend_for(cfg.dist_backend, device), rank=rank,
                                         world_size=world)
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        dp = DataParallel(rank, world, cfg.sharding, device)
        art = lambda d: Artifact(d["key"], Path(d["path"]))  # noqa: E731
        pol = lambda d: Policy(d["key"], Path(d["path"]), d.get("label", "")) if d else None  # noqa: E731
        ctx = StageContext(Path(spec["out_dir"]), ModelPool(device=device),
                           show_progress=spec.get("show_progress", True) and dp.is_main)
        train_stage.train_local(cfg, art(spec["rollouts"]), art(spec["targets"]), pol(spec["init"]),
                                ctx, teacher=pol(spec.get("teacher")),
                                teacher_dtype=spec.get("teacher_dtype", "bfloat16"),
                                teacher_batch_size=spec.get("teacher_batch_size", 32), dist=dp)
        dp.barrier()  # rank 0's files are written before any node's torchrun returns
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--node":
        # another node of a multi-node stage: run this node's ranks of the spec
        run_node(Path(sys.argv[2]), log_name=f"dist-{os.uname().nodename}-{os.getpid()}.log")
    else:
        main(sys.argv[1])
