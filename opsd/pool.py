"""Models kept resident across stages (and across online iterations), on the run's device.

A pipeline process loads each model folder once: an fp32 master for training and, per compute
dtype, an inference copy for generation and scoring. Reloading a 135M model costs seconds; a 7B
model costs minutes — flows never reload between stages or iterations.

Every model the pool hands out lives on :attr:`ModelPool.device` (the run's one device decision,
``opsd.device``): nothing is moved between devices behind a caller's back. Where the fp32 master
comes from differs by device, to keep the accelerator's memory for what runs there:

* CPU: the master is loaded once and the inference copies are cast from it (as always);
* CUDA: an inference copy is loaded straight into its dtype on the GPU when no master is resident
  (a bf16 copy of an 8B model is 16 GB; its fp32 master would add 32 GB that nothing reads). The
  master is loaded only when training asks for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.backends.hf import cast_for_inference
from opsd.device import resolve_dtype
from opsd.models import load_model, load_tokenizer, model_fingerprint
from opsd.policy import Policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelPool:
    masters: dict[str, torch.nn.Module] = field(default_factory=dict)
    copies: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict)
    tokenizers: dict[str, object] = field(default_factory=dict)
    # where every model of this pool lives (a run passes its resolved ``device``)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    def tokenizer(self, policy: Policy):
        key = str(policy.path)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(policy.path)
        return self.tokenizers[key]

    def dtype(self, name: str) -> str:
        """A config dtype (``auto`` allowed) as the dtype that runs on this pool's device."""
        return resolve_dtype(name, self.device)

    def master(self, policy: Policy) -> torch.nn.Module:
        """The fp32 model for ``policy`` on this pool's device (loaded once)."""
        if policy.key not in self.masters:
            self.masters[policy.key] = load_model(policy.path, torch.float32, device=self.device)
        return self.masters[policy.key]

    def inference(self, policy: Policy, dtype: str) -> torch.nn.Module:
        """An eval-mode copy in ``dtype`` (``auto``: the device's fast dtype) on this pool's
        device; shares the master when the dtype matches."""
        dtype = self.dtype(dtype)
        k = (policy.key, dtype)
        if k not in self.copies:
            if policy.key in self.masters or self.device.type == "cpu":
                self.copies[k] = cast_for_inference(self.master(policy), DTYPES[dtype])
            else:
                self.copies[k] = load_model(policy.path, DTYPES[dtype], device=self.device)
        return self.copies[k]

    def adopt(self, policy: Policy, model: torch.nn.Module) -> None:
        """Register an in-memory model (a freshly trained student) under ``policy.key``."""
        _check_on(model, self.device, f"model adopted as {policy.key}")
        self.masters[policy.key] = model

    def take_master(self, policy: Policy) -> torch.nn.Module:
        """Hand the fp32 master of ``policy`` over for training: the pool forgets it (a later
        ``master()`` reloads it from disk), so no second fp32 copy is held for the trainer. An
        inference copy that *is* the master (fp32) is replaced by a private copy first."""
        model = self.master(policy)
        for k, m in list(self.copies.items()):
            if m is model:
                self.copies[k] = copy.deepcopy(model)  # same dtype as the master: a plain copy
        del self.masters[policy.key]
        return model

    def drop_copies(self, key: str, keep: torch.nn.Module | None = None) -> None:
        """Forget the inference copies of ``key`` (all but ``keep``); they are rebuilt on demand."""
        for k in [k for k, m in self.copies.items() if k[0] == key and m is not keep]:
            self.copies.pop(k)


def _check_on(model: torch.nn.Module, device: torch.device, what: str) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "meta" and not _same(p.device, device):
        raise ValueError(f"{what} is on {p.device}, the pool's models on {device}: move it "
                         "explicitly (models never change devices implicitly)")


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def base_policy(path: Path) -> Policy:
    return Policy(key=f"model-{model_fingerprint(path)}", path=path, label="base")
