"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for the train stage.

A targeted linear layer ``y = W x + b`` becomes

    y = W x + b + (alpha / r) · B (A x),     A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

with W and b frozen: only A and B train (``r·(in + out)`` numbers per layer instead of
``in·out``), and B = 0 makes the adapted model equal the base at step 0. When training ends the
adapters are folded back, ``W ← W + (alpha / r) · B A``, so what the stage writes is a plain
Hugging Face checkpoint of the base architecture: every later stage (evaluation, vLLM, the next
iteration) reads it as it reads any other. Biderman et al. (2024, *LoRA Learns Less and Forgets
Less*, arXiv:2405.09673) measure the trade this buys on 7B models: less of the target task, less
loss elsewhere.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        a_ri = torch.empty(rank, base.in_features, dtype=torch.float32)
        # nn.Linear's own init (the paper's choice for A); drawn on the CPU from a seeded
        # generator so the same seed gives the same adapters on any device
        nn.init.kaiming_uniform_(a_ri, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a_ri.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """``base`` with the update folded into its weight (in place)."""
        with torch.no_grad():
            delta_oi = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            self.base.weight.add_(delta_oi.to(self.base.weight.dtype))
        return self.base


def add_adapters(model: nn.Module, targets: str, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose module name ``targets`` finds
    (``re.search``) in a :class:`LoRALinear`; only the adapters then require gradients. Returns the
    wrapped names. The output embedding (``lm_head``, tied to the input embedding in many small
    models) is never wrapped: folding an update into it would change the embedding too."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    chosen = [name for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and re.search(targets, name)
              and not name.endswith("lm_head")]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"train.lora.targets {targets!r} finds none of the model's "
                         f"{len(linears)} linear layers (e.g. {', '.join(linears[:4])})")
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, generator))
    return chosen


def merge_adapters(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` back into a plain ``nn.Linear`` (in place), so
    its parameter names and shapes are the base architecture's again. Returns how many."""
    wrapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name, mod in wrapped:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, mod.merged())
    return len(wrapped)
