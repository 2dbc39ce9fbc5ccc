"""Data-parallel offline training on PyTorch's own engine (``torchrun`` + ``torch.distributed``).

With ``train.world_size > 1`` (processes per node) the train stage writes a small JSON spec and
launches

    python -m torch.distributed.run --nnodes 1 --nproc_per_node N -m opsd.stages.train_worker SPEC

and, with ``train.nnodes > 1``, a c10d rendezvous (``--rdzv-backend c10d --rdzv-endpoint
train.rdzv_endpoint``) that every other node joins with ``python -m opsd.stages.train_worker
--node SPEC`` (:func:`node_command`). Every rank loads the initial weights and the cached
targets, walks the same batch plan, and trains on its share of every optimiser batch
(``batch[rank::world]``). Each rank scales its token losses by ``1 / tokens in the whole batch``,
so the *sum* of the ranks' gradients is exactly the one-process gradient; clipping and AdamW then
run identically on every rank. The global rank 0 (wherever the rendezvous puts it) writes resume
points, metrics and the checkpoint into the stage's folder, which with several nodes must be on a
file system they share; the launching process publishes it as usual. ``nccl`` when the run's
device is CUDA (one GPU per rank: ``cuda:LOCAL_RANK``), else ``gloo``.

The loss runs through a module whose forward *is* the micro-batch loss
(:class:`opsd.training.loss.LossModule`): the loss code calls the decoder and the chunked LM head
itself, never the model's own forward, and PyTorch's wrappers act from the hooks of the module
they wrap. Two wrappers, chosen by ``train.sharding``:

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` around that module. Its reducer
  all-reduces gradient buckets *while* the backward pass still runs (communication overlaps
  compute), in the last micro-batch of each optimiser batch (``no_sync`` accumulates the others
  locally). A communication hook sums the buckets instead of DDP's default average. Every rank
  holds the full weights, so each loads the full checkpoint.
* ``fsdp``: FSDP2 (``fully_shard``): every decoder layer is one unit and the rest of the model
  (embeddings = tied LM head, final norm) belongs to the root unit, gathered around every use
  (the decoder call, the chunked LM head and its recomputation in backward) and reduce-scattered
  after. Each rank keeps 1/N of the weights, gradients and AdamW moments. The model is built on
  the meta device, sharded, and each rank reads only its rows of every tensor from the
  safetensors files (:meth:`DataParallel.load_sharded`), so no rank ever holds the full fp32
  model. Gradients are reduce-*summed* (the losses carry the batch's token scale). Checkpoints
  and resume points are gathered to full tensors and written by rank 0 in the one-process format;
  a resume point is read in full by every rank, which keeps its shard (the optimiser state of a
  resume point has no per-rank layout to read from).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def _sum_allreduce(process_group, bucket):
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default hook divides
    by the world size; opsd's losses are already scaled by the whole batch's token count)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass
class DataParallel:
    """This process's rank in an initialised process group."""

    rank: int
    world_size: int
    sharding: str = "ddp"  # TrainConfig.sharding: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    device: torch.device = torch.device("cpu")  # this rank's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp"

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world_size]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The loss module around ``model``, under DDP or FSDP2 (``sharding``). Call before the
        optimiser is built: under FSDP it must hold the sharded parameters."""
        from opsd.training.loss import LossModule

        root = LossModule(model)
        if self.sharded:
            self.fully_shard(root, model)
            return root
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: the only buffers (rotary frequencies) are equal constants, and
        # a broadcast before every forward would be a collective per micro-batch for nothing
        ddp = DistributedDataParallel(root, broadcast_buffers=False, gradient_as_bucket_view=True)
        ddp.register_comm_hook(None, _sum_allreduce)
        return ddp

    @staticmethod
    def accumulating(forward: torch.nn.Module, last: bool):
        """Context of one micro-batch's forward + backward: DDP reduces only in the last one of
        an optimiser batch (``no_sync`` keeps the others' gradients local); FSDP reduce-scatters
        every micro-batch (holding unsharded gradients across micro-batches would give up the
        memory it is there to save)."""
        if not last and hasattr(forward, "no_sync"):
            return forward.no_sync()
        return contextlib.nullcontext()

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

        mesh = init_device_mesh(self.device.type, (self.world_size,))
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

    def load_sharded(self, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The fp32 model of the folder ``path`` sharded over the ranks without any rank holding
        all of it: built on the meta device (parameters only: buffers such as the rotary
        frequencies are computed for real), sharded (:meth:`fully_shard`), allocated on this
        rank's device, and filled with this rank's rows of each tensor, read through safetensors'
        slices. Returns (model, the sharded loss module to train with)."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        from opsd.training.loss import LossModule

        config = AutoConfig.from_pretrained(path)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        root = LossModule(model)
        self.fully_shard(root, model)
        root.to_empty(device=self.device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            _load_local_rows(model, Path(path), self.device)
        if (Path(path) / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
        model.eval()
        return model, root

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
        (the full model on every rank with ddp, about 1/world_size of it with fsdp), the
        process's peak resident memory in MiB and (CUDA) its peak device memory in MiB."""
        import resource

        local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
        params = sum(local(p) for p in model.parameters())
        moments = sum(local(v) for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)  # not the scalar step counters
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        on_gpu = self.device.type == "cuda"
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if on_gpu else 0.0
        w = self.world_size
        counts = [0.0] * (4 * w)
        counts[self.rank], counts[w + self.rank], counts[2 * w + self.rank] = params, moments, rss
        counts[3 * w + self.rank] = gpu
        counts = self.sum(counts)
        return {"params": [int(c) for c in counts[:w]], "adamw_state": [int(c) for c in counts[w : 2 * w]],
                "peak_rss_mib": [round(c) for c in counts[2 * w : 3 * w]],
                "peak_device_mib": [round(c) for c in counts[3 * w :]] if on_gpu else None}

    # small reductions of statistics: on the rank's device (NCCL reduces CUDA tensors only)
    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def min(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t)

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        dist.barrier()


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every ``nn.Parameter`` on the meta device while a model is built (no storage),
    leaving buffers real: a model's non-persistent buffers (rotary frequencies) are computed in
    its constructor and are in no checkpoint. Each parameter exists for real only for the moment
    its module registers it (one tensor at a time, never the model)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    from safetensors import safe_open

    single = path / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def _load_local_rows(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Fill each (sharded) parameter with its rank's rows, read from the checkpoint files.

    FSDP2 shards dim 0 in ``ceil(rows / world)``-row chunks, rank r holding chunk r; a safetensors
    slice reads those rows from the file (memory-mapped) and nothing else. Tied parameters are
    loaded once (under the name the checkpoint stores)."""
    from safetensors import safe_open

    from torch.distributed.tensor import DTensor, Shard

    files = _checkpoint_files(path)
    handles: dict[Path, object] = {}
    try:
        for name, p in model.named_parameters():  # tied parameters appear once
            aliases = [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]
            stored = next((n for n in aliases if n in files), None)
            if stored is None:
                raise KeyError(f"{name} (aliases {aliases}) is not in the checkpoint {path}")
            f = handles.setdefault(files[stored], safe_open(str(files[stored]), framework="pt"))
            if isinstance(p, DTensor):
                local = p.to_local()
                if p.placements == (Shard(0),):
                    rows = f.get_slice(stored).get_shape()[0]
                    chunk = -(-rows // p.device_mesh.size())
                    start = min(rows, p.device_mesh.get_local_rank() * chunk)
                    part = f.get_slice(stored)[start : start + local.shape[0]]
                else:
                    part = f.get_tensor(stored)
                local.copy_(part.to(device=device, dtype=local.dtype))
            else:
                p.copy_(f.get_tensor(stored).to(device=device, dtype=p.dtype))
    finally:
        handles.clear()


def backend_for(name: str, device: torch.device | str = "cpu") -> str:
    """``auto``: NCCL for CUDA ranks, gloo for CPU ranks (not "whatever the machine has": a
    ``device: cpu`` run on a GPU machine trains on CPU tensors, which NCCL cannot reduce)."""
    if name != "auto":
        return name
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(spec_path: Path, nproc_per_node: int, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "opsd") -> list[str]:
    """The ``torchrun`` command of one node: static rendezvous on a free local port for one
    node, c10d rendezvous at ``rdzv_endpoint`` for several (torch's own launcher and agent)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        cmd += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    else:
        if not rdzv_endpoint:
            raise ValueError("nnodes > 1 needs a rendezvous endpoint (train.rdzv_endpoint)")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}",
                f"--rdzv_id={rdzv_id}"]
    return cmd + ["-m", "opsd.stages.train_worker", str(spec_path)]


def node_command(spec_path: Path) -> str:
    """What every other node runs to join a multi-node train stage (same code, same OPSD home)."""
    return f"python -m opsd.stages.train_worker --node {spec_path}"


def launch(spec: dict, work_dir: Path, world_size: int, *, nnodes: int = 1,
           rdzv_endpoint: str | None = None, log_name: str = "dist.log") -> None:
    """Write the spec, run this node's ranks with torchrun and wait; raise with the log's tail
    when any rank fails. ``world_size``: processes on this node."""
    spec_path = work_dir / "dist_spec.json"
    spec = {**spec, "nproc_per_node": world_size, "nnodes": nnodes, "rdzv_endpoint": rdzv_endpoint,
            # one rendezvous per stage folder: a rerun of the same stage joins a new one
            "rdzv_id": spec.get("rdzv_id") or f"opsd-{os.getpid()}-{_free_port()}",
            # the ranks end themselves when this process dies (exit_when_orphaned)
            "owner": {"pid": os.getpid(), "host": socket.gethostname()}}
    spec_path.write_text(json.dumps(spec, indent=2))
    run_node(spec_path, log_name=log_name)


def rank_pids(pid: int) -> list[int]:
    """PIDs of the torchrun worker ranks below process ``pid`` (Linux ``/proc``). torchrun starts
    each rank in a session of its own, so they are found by parent links, not by session; the
    soak (bench/fault_injection.py) and the kill tests use it to find what is still training."""
    children: dict[int, list[int]] = {}
    commands: dict[int, bytes] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(d.name)] = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        cmd = commands.get(p, b"")
        if b"opsd.stages.train_worker" in cmd and b"torch.distributed.run" not in cmd:
            found.append(p)
    return sorted(found)


def exit_when_orphaned(owner: dict | None, interval: float = 1.0) -> None:
    """Make this rank end (SIGKILL) within ``interval`` seconds of losing its run.

    torchrun starts every rank in a session of its own, so a SIGKILL of the run's process group
    (a killed ``opsd run``, what a node failure does to it) leaves the ranks alive: measured,
    both ranks of a killed run went on training and writing into the stage's staging folder —
    the folder the rerun resumes from and writes too. A daemon thread watches the rank's parent
    (the torchrun agent) and, on the owner's host, the process that launched the stage."""
    import signal
    import threading
    import time

    from opsd.storage.layout import pid_alive

    parent = os.getppid()
    local = owner is not None and owner.get("host") == socket.gethostname()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or (local and not pid_alive(int(owner["pid"]))):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="opsd-orphan-watch").start()


def run_node(spec_path: Path, log_name: str = "dist.log") -> None:
    """Run this node's ranks of the spec at ``spec_path`` with torchrun and wait."""
    spec = json.loads(Path(spec_path).read_text())
    work_dir = Path(spec_path).parent
    nproc = int(spec["nproc_per_node"])
    cmd = torchrun_command(Path(spec_path), nproc, int(spec.get("nnodes", 1)),
                           spec.get("rdzv_endpoint"), spec.get("rdzv_id", "opsd"))
    # Each rank gets an equal share of the cores (torchrun's default of 1 thread would idle them).
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log_path = work_dir / log_name
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"distributed training ({nproc} ranks on this node, "
                           f"{spec.get('nnodes', 1)} node(s)) failed with exit code {rc}; "
                           f"log {log_path}:\n{tail}")
