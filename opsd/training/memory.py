"""Activation checkpointing decided from memory (``train.activation_checkpointing: auto``).

Checkpointing recomputes every decoder layer in backward instead of keeping its activations:
the same loss and gradients for about one more forward pass of compute. It is worth paying only
when the activations would not fit. ``auto`` decides per micro-batch:

* CPU: off (host memory is the quickstart's limit only at sizes the CPU path is not for; the
  TRL-matched setting measured +15 % step time for -1.4 GB, docs/benchmarks.md);
* CUDA: on when the micro-batch's estimated activations exceed the memory still free on the
  device (what the allocator holds unused counts as free), with a 20 % margin.

The estimate: bytes ≈ tokens × layers × (24·hidden + 9·intermediate). Calibrated on the one GPU
measurement there is (docs/benchmarks.md, H100, 415M Llama, d = 1024, intermediate 4096, micro-
batch 16 × 1024 tokens, bf16 autocast): 30.2 GiB peak without checkpointing, 7.9 GiB with, i.e.
60.8 KB per token and layer; the formula gives 61.4 KB there (the layer's fp32 residual and norm
inputs, bf16 q/k/v/attention/projection inputs, the MLP's gate/up/activation outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MARGIN = 0.8  # use at most this share of the free memory for activations


def activation_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Estimated bytes of the activations a micro-batch of ``tokens`` positions keeps for the
    backward pass without checkpointing (see the module docs)."""
    c = model.config
    hidden = int(getattr(c, "hidden_size", 0) or 0)
    inter = int(getattr(c, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(c, "num_hidden_layers", 0) or 0)
    return tokens * layers * (24 * hidden + 9 * inter)


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get on ``device`` (None: not an accelerator)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached_unused)


def _layers_with_flag(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def enable(model: torch.nn.Module) -> None:
    """Install non-reentrant checkpointing on the model's decoder layers (transformers 5 renamed
    gradient_checkpointing_enable and deprecated the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Checkpointing:
    """Whether each micro-batch checkpoints its decoder layers; counts what it decided."""

    mode: bool | str  # True, False or "auto"
    model: torch.nn.Module
    device: torch.device
    decided: dict = field(default_factory=lambda: {"micro_batches": 0, "checkpointed": 0})

    def __post_init__(self) -> None:
        self._auto = self.mode == "auto" and self.device.type != "cpu"
        if self.mode is True or self._auto:
            enable(self.model)
            self._layers = _layers_with_flag(self.model)
            self._set(self.mode is True)

    def _set(self, on: bool) -> None:
        for m in self._layers:
            m.gradient_checkpointing = on

    def before(self, tokens: int) -> bool:
        """Decide for a micro-batch of ``tokens`` padded positions; returns the decision."""
        on = self.mode is True
        if self._auto:
            free = free_bytes(self.device)
            on = free is not None and activation_bytes(self.model, tokens) > MARGIN * free
            self._set(on)
        self.decided["micro_batches"] += 1
        self.decided["checkpointed"] += int(on)
        return on

    def summary(self) -> dict:
        """For the train manifest: the setting and how many micro-batches checkpointed."""
        return {"setting": self.mode, **self.decided}
