"""Resumable training state without pickle: safetensors for tensors, JSON for the rest.

A resume point holds the model weights, the AdamW moments, the scheduler
position, the RNG state and the loop counters. It is written into a temporary
folder and renamed over the previous one, so a crash during the write keeps the
last complete resume point.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scal in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scal)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_resume_point(folder: Path, model: torch.nn.Module, opt, sched, counters: dict) -> None:
    """Atomically replace ``folder`` with the current training state."""
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Tied weights (embeddings = LM head) share storage; safetensors wants them once.
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for k in list(weights):
        ptr = weights[k].data_ptr()
        if ptr in seen:
            aliases[k] = seen[ptr]
            del weights[k]
        else:
            seen[ptr] = k
    save_file(weights, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {
        "counters": counters,
        "optimizer": opt_meta,
        "scheduler": {"last_epoch": sched.last_epoch, "_step_count": getattr(sched, "_step_count", 0)},
        "aliases": aliases,
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=float))
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def has_resume_point(folder: Path) -> bool:
    return (folder / STATE_FILE).exists()


def load_resume_point(folder: Path, model: torch.nn.Module, opt, sched) -> dict:
    """Restore model, optimizer, scheduler and RNG; returns the saved counters."""
    meta = json.loads((folder / STATE_FILE).read_text())
    weights = load_file(str(folder / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        weights[alias] = weights[target]
    model.load_state_dict(weights, strict=True)
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_tensors.pop("_empty", None)
    _load_optimizer(opt, opt_tensors, meta["optimizer"])
    sched.last_epoch = meta["scheduler"]["last_epoch"]
    if hasattr(sched, "_step_count"):
        sched._step_count = meta["scheduler"]["_step_count"]
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    return meta["counters"]
