"""Inference linears with weights pre-reordered for oneDNN (CPU, bf16).

``F.linear`` on a CPU bf16 weight lets oneDNN reorder the weight into its blocked
(AMX/AVX-512) layout on every call: at decode sizes that reorder reads and writes
the whole weight each step. An inference copy never changes between refreshes,
so it can hold every linear's weight in the blocked layout once (the layout
PyTorch's own inductor uses for frozen CPU graphs): same outputs bit for bit,
measured on this 2-core Xeon (SmolLM2-135M, bf16): one 576x1536 product at
M = 16 rows 159 -> 122 us, a 16-reply x 48-token rollout 2.54 -> 2.06 s,
teacher scoring 0.65 -> 0.56 s.

Only bf16 CPU copies are packed, and only after a self-check on this machine
(:func:`supported`); anything else keeps ``nn.Linear``.
"""

from __future__ import annotations

import copy
import functools
import os

import torch

# oneDNN picks its blocking for this many rows; the measured gain holds from 1 to 2048 rows
BATCH_HINT = 16


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), BATCH_HINT)


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether packed bf16 linears work here and match ``F.linear`` exactly (CPU with oneDNN).
    ``OPSD_PREPACK=0`` turns them off (an escape hatch, and the baseline of benchmarks)."""
    if os.environ.get("OPSD_PREPACK", "1").lower() in ("0", "false", "no"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(torch.bfloat16)
        b = torch.randn(48, generator=g).to(torch.bfloat16)
        x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
        got = torch.ops.mkldnn._linear_pointwise(x, _pack(w), b, "none", [], "")
        return bool(torch.equal(got, torch.nn.functional.linear(x, w, b)))
    except (RuntimeError, AttributeError):  # an op missing from this build, an ISA oneDNN lacks
        return False


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` (inference only) holding its weight in oneDNN's blocked layout.

    The packed weight is an opaque tensor kept as a plain attribute (not a parameter: it has
    no storage to save or move); :meth:`load_` repacks from a dense weight (an in-place
    refresh from the training master), ``weight`` unpacks a dense copy for code that reads it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)
        self.bias = None if bias is None else torch.nn.Parameter(
            bias.detach().to(torch.bfloat16), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    @torch.no_grad()
    def load_(self, weight: torch.Tensor) -> None:
        self.packed = _pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise RuntimeError("this inference copy's weights were released (release_packed) and "
                               "not refreshed since")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        torch.nn.Module.__init__(new)
        new.out_features, new.in_features = self.out_features, self.in_features
        # opaque tensors have no storage for deepcopy
        new.packed = None if self.packed is None else self.packed.clone()
        new.bias = copy.deepcopy(self.bias, memo)
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=bf16"


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every bf16 CPU ``nn.Linear`` of ``model`` (an inference copy) by a
    :class:`PackedLinear`; returns how many. A tied LM head gets a packed copy of its own
    (the embedding keeps the dense weight for lookups)."""
    if not supported():
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            w = getattr(child, "weight", None)
            if type(child) is torch.nn.Linear and w is not None and w.dtype == torch.bfloat16 \
                    and w.device.type == "cpu":
                setattr(module, name, PackedLinear(w, child.bias))
                n += 1
    return n


def release_packed(model: torch.nn.Module) -> None:
    """Free the packed weights of ``model`` until the next :func:`refresh_from` (an online
    rollout copy while its master trains: the step's memory peak without that copy)."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.packed = None


@torch.no_grad()
def refresh_from(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy ``src``'s weights into the inference copy ``dst`` in place (casting dtype), by name:
    packed linears are repacked, every other tensor is copied."""
    src_t = dict(src.named_parameters(remove_duplicate=False))
    src_t.update(dict(src.named_buffers(remove_duplicate=False)))
    for name, module in dst.named_modules():
        if isinstance(module, PackedLinear):
            prefix = f"{name}." if name else ""
            module.load_(src_t[f"{prefix}weight"])
    for name, t in dst.state_dict().items():  # biases of packed linears included
        t.copy_(src_t[name])
