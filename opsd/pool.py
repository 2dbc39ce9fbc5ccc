"""Models kept resident across stages (and across online iterations).

A pipeline process loads each model folder once: an fp32 master for training
and, per compute dtype, an inference copy for generation and scoring. Reloading
a 135M model costs seconds; a 7B model costs minutes — flows never reload
between stages or iterations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd.backends.hf import cast_for_inference
from opsd.models import load_model, load_tokenizer, model_fingerprint
from opsd.policy import Policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelPool:
    masters: dict[str, torch.nn.Module] = field(default_factory=dict)
    copies: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict)
    tokenizers: dict[str, object] = field(default_factory=dict)

    def tokenizer(self, policy: Policy):
        key = str(policy.path)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(policy.path)
        return self.tokenizers[key]

    def master(self, policy: Policy) -> torch.nn.Module:
        """The fp32 model for ``policy`` (loaded once)."""
        if policy.key not in self.masters:
            self.masters[policy.key] = load_model(policy.path, torch.float32)
        return self.masters[policy.key]

    def inference(self, policy: Policy, dtype: str) -> torch.nn.Module:
        """An eval-mode copy in ``dtype``; shares the master when the dtype matches."""
        k = (policy.key, dtype)
        if k not in self.copies:
            self.copies[k] = cast_for_inference(self.master(policy), DTYPES[dtype])
        return self.copies[k]

    def adopt(self, policy: Policy, model: torch.nn.Module) -> None:
        """Register an in-memory model (a freshly trained student) under ``policy.key``."""
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


def base_policy(path: Path) -> Policy:
    return Policy(key=f"model-{model_fingerprint(path)}", path=path, label="base")
