"""torchrun worker entry point of the train stage: one process per rank.

``opsd.training.distributed.launch`` starts ``python -m torch.distributed.run ... -m
opsd.stages.train_worker SPEC``; each rank reads the JSON spec the train stage wrote and runs
:func:`opsd.stages.train.train_local` on its share of every batch. It lives with the train stage
(not in the library) because it calls the stage: the library never imports a stage.
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
from opsd.training.distributed import DataParallel, backend_for


def main(spec_path: str) -> None:
    """Worker entry point (one per rank, started by torchrun)."""
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig.model_validate(spec["train"])
    torch.distributed.init_process_group(backend_for(cfg.dist_backend), rank=rank, world_size=world)
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        dp = DataParallel(rank, world, cfg.sharding)
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
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
