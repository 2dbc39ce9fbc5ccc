"""Resumable training state without pickle: safetensors for tensors, JSON for the rest.

A resume point holds the model weights, the AdamW moments, the scheduler
position, the RNG state and the loop counters. It is written into a temporary
folder and renamed over the previous one, so a crash during the write keeps the
last complete resume point.

When part of the model is frozen (LoRA adapters, ``train.trainable``) a resume point holds only
the parameters that train: the frozen ones are the init checkpoint's, which a rerun reads again
anyway. Rank-16 adapters on every projection of a Llama-8B are 42 M numbers: 0.17 GB of fp32
weights per resume point instead of 32 GB.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scal in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scal)
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their ``state_dict`` names."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_resume_point(folder: Path, model: torch.nn.Module, opt, sched, counters: dict, *,
                      weights: dict | None = None, optimizer: dict | None = None,
                      rng_state: torch.Tensor | None = None, trainable_only: bool = False) -> None:
    """Atomically replace ``folder`` with the current training state.

    ``weights`` / ``optimizer``: full state dicts gathered from a sharded model (FSDP), in the
    layout of ``model.state_dict()`` / ``opt.state_dict()``; by default those of ``model``, ``opt``.
    ``rng_state``: the torch RNG state to store (default: the current one).
    ``trainable_only``: store only the parameters that train (the rest is frozen at the init
    checkpoint's values, which the loading run must already hold).
    """
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights is None:
        weights = trainable_state(model) if trainable_only else model.state_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
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
    opt_tensors, opt_meta = _optimizer_tensors(optimizer if optimizer is not None else opt.state_dict())
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state() if rng_state is None else rng_state}
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {
        "counters": counters,
        "optimizer": opt_meta,
        "scheduler": {"last_epoch": sched.last_epoch, "_step_count": getattr(sched, "_step_count", 0)},
        "aliases": aliases,
        "weights": "trainable" if trainable_only else "all",
    }
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=float))
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def has_resume_point(folder: Path) -> bool:
    return (folder / STATE_FILE).exists()


def load_resume_point(folder: Path, model: torch.nn.Module, opt, sched, *,
                      load_state: Callable[[dict, dict], None] | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG; returns the saved counters.

    ``load_state(weights, optimizer_state)`` loads the full state dicts into a sharded model
    (FSDP); by default ``model.load_state_dict`` and ``opt.load_state_dict``.
    """
    meta = json.loads((folder / STATE_FILE).read_text())
    weights = load_file(str(folder / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        weights[alias] = weights[target]
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_tensors.pop("_empty", None)
    opt_state = _optimizer_state(opt_tensors, meta["optimizer"])
    if load_state is not None:
        load_state(weights, opt_state)
    elif meta.get("weights") == "trainable":
        # checked before anything loads: a refused resume point leaves the model as it was
        trains = set(trainable_state(model))
        if set(weights) != trains:
            raise ValueError(
                f"the resume point in {folder} holds the trainable parameters of another model "
                f"({len(weights)} saved, {len(trains)} train here; not trained here: "
                f"{sorted(set(weights) - trains)[:3]}, "
                f"not saved: {sorted(trains - set(weights))[:3]})")
        model.load_state_dict(weights, strict=False)  # the rest: the init checkpoint's weights
        opt.load_state_dict(opt_state)
    else:
        model.load_state_dict(weights, strict=True)
        opt.load_state_dict(opt_state)
    sched.last_epoch = meta["scheduler"]["last_epoch"]
    if hasattr(sched, "_step_count"):
        sched._step_count = meta["scheduler"]["_step_count"]
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    return meta["counters"]
