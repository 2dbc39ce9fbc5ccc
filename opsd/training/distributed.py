"""Data-parallel offline training on PyTorch's own engine (``torchrun`` + ``torch.distributed``).

With ``train.world_size > 1`` the train stage writes a small JSON spec and launches

    python -m torch.distributed.run --standalone --nproc_per_node N -m opsd.stages.train_worker SPEC

Every rank loads the same initial weights and the cached targets, walks the same batch plan, and
trains on its share of every optimiser batch (``batch[rank::N]``). Each rank scales its token
losses by ``1 / tokens in the whole batch``, so the all-reduced *sum* of the ranks' gradients is
exactly the one-process gradient; clipping and AdamW then run identically on every rank and the
replicas stay equal without broadcasting weights. Rank 0 alone writes resume points, metrics and
the checkpoint into the stage's temporary folder; the parent process publishes it as usual.

Gradients are reduced in flat buckets after the backward pass (what DDP's reducer does, without
overlapping it with backward): the decoder is called directly by the loss code (chunked LM head),
which a ``DistributedDataParallel`` wrapper's forward hooks would not see.

``train.sharding: fsdp`` shards instead of replicating, with PyTorch's FSDP2 (``fully_shard``):
every decoder layer is one FSDP unit and the rest of the model (embeddings = tied LM head, final
norm) belongs to the root unit, a module whose forward *is* the micro-batch loss
(:class:`opsd.training.loss.LossModule`) — FSDP2 gathers a unit's parameters and reduce-scatters
their gradients from the hooks of the module it wraps, and the loss code never calls the model's
own forward. Each rank keeps 1/N of the weights, gradients and AdamW moments; the gradients are
reduce-*summed* (the losses are already scaled by the whole batch's token count), so clipping (on
the global norm) and AdamW give the one-process update. Checkpoints and resume points are
gathered to full tensors and written by rank 0 in the one-process format.
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
    sharding: str = "ddp"  # TrainConfig.sharding: "ddp" (replicas) or "fsdp" (FSDP2 shards)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp"

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

    # ---------------------------------------------------------------- FSDP2 (sharding: fsdp)

    def fully_shard(self, root: torch.nn.Module, model: torch.nn.Module) -> None:
        """Shard ``model`` with FSDP2: one unit per decoder layer, everything else in ``root``'s.

        ``root`` contains ``model`` and its forward runs the whole loss, so the root unit's
        parameters (embeddings = tied LM head, final norm) are gathered around every use — the
        decoder call, the chunked LM head and its recomputation in backward — and reduced after.
        Call before the optimiser is built: it must hold the sharded parameters.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(next(model.parameters()).device.type, (self.world_size,))
        for layer in getattr(model.get_decoder(), "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(root, mesh=mesh)
        for m in root.modules():
            if isinstance(m, FSDPModule):
                # Each rank's loss is already scaled by 1 / (tokens of the whole batch): the
                # gradients must be summed over the ranks, not averaged (FSDP's default).
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        # A parameter without a gradient on one rank still takes part in the reduce-scatter
        # (as zeros), so the ranks' collectives always match.
        root.set_reduce_scatter_unused_params(True)

    @staticmethod
    def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded weights on rank 0 (CPU), ``{}`` on the others; every rank must call it.

        Tied parameters map to one tensor, as in ``model.state_dict()``, so ``save_pretrained``
        and resume points store them once, exactly as a one-process run does.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for group in names.values():
            for alias in group[1:]:
                if group[0] in sd:
                    sd[alias] = sd[group[0]]
        return sd

    @staticmethod
    def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
        """Names of the optimiser's parameters in its own order (``opt.state_dict()``'s ids)."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]

    def full_optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
        """AdamW's unsharded state on rank 0, ``{}`` on the others; every rank must call it.

        Laid out like ``opt.state_dict()`` of one process (parameters numbered in the optimiser's
        order), so a resume point does not depend on how the run was sharded.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, opt,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}
        index = {n: i for i, n in enumerate(self._param_names(model, opt))}
        return {"state": {index[n]: st for n, st in osd["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                 for g in osd["param_groups"]]}

    def load_full_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        weights: dict[str, torch.Tensor], optimizer: dict) -> None:
        """Load full weights and optimiser state (a resume point, read by every rank): each rank
        keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
        names = self._param_names(model, opt)
        osd = {"state": {names[int(i)]: st for i, st in optimizer["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in optimizer["param_groups"]]}
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))

    def per_rank(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, list]:
        """What each rank held (collective): elements of the parameters and of the AdamW moments
        (the full model on every rank with ddp, about 1/world_size of it with fsdp) and the
        process's peak resident memory in MiB."""
        import resource

        local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
        params = sum(local(p) for p in model.parameters())
        moments = sum(local(v) for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)  # not the scalar step counters
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        w = self.world_size
        counts = [0.0] * (3 * w)
        counts[self.rank], counts[w + self.rank], counts[2 * w + self.rank] = params, moments, rss
        counts = self.sum(counts)
        return {"params": [int(c) for c in counts[:w]], "adamw_state": [int(c) for c in counts[w : 2 * w]],
                "peak_rss_mib": [round(c) for c in counts[2 * w :]]}

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
           f"--master_port={_free_port()}", "-m", "opsd.stages.train_worker", str(spec_path)]
    # Each rank gets an equal share of the cores (torchrun's default of 1 thread would idle them).
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"distributed training ({world_size} ranks) failed with exit code {rc}; "
                           f"log {log_path}:\n{tail}")
