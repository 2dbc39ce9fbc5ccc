"""A KV cache whose layers append into preallocated buffers.

transformers' ``DynamicCache`` appends with ``torch.cat``: every decode step
allocates a fresh copy of every layer's keys and values. On a CPU that churn —
hundreds of MB per step for a long privileged context — costs more than the
model's own matmuls (page faults, allocator trimming). These layers reserve
``capacity`` positions once and write new keys/values in place; attention reads
a view of the filled part.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    capacity: int = 0  # set on a subclass by make_cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def _grow(self, need: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = max(need, self.capacity, 2 * (self._kbuf.shape[-2] if self._kbuf is not None else 0))
        B, H, _, Dk = like_k.shape
        kbuf = like_k.new_empty((B, H, cap, Dk))
        vbuf = like_v.new_empty((B, H, cap, like_v.shape[-1]))
        if self._kbuf is not None and self._len:
            kbuf[:, :, : self._len] = self._kbuf[:, :, : self._len]
            vbuf[:, :, : self._len] = self._vbuf[:, :, : self._len]
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._len + key_states.shape[-2]
        if self._kbuf is None or n > self._kbuf.shape[-2]:
            self._grow(n, key_states, value_states)
        self._kbuf[:, :, self._len : n] = key_states
        self._vbuf[:, :, self._len : n] = value_states
        self._len = n
        self.keys = self._kbuf[:, :, :n]
        self.values = self._vbuf[:, :, :n]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kbuf is None:
            return
        self._kbuf = self._kbuf[indices]
        self._vbuf = self._vbuf[indices]
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._kbuf is None:
            return
        self._kbuf = self._kbuf.repeat_interleave(repeats, dim=0)
        self._vbuf = self._vbuf.repeat_interleave(repeats, dim=0)
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]


def make_cache(capacity: int) -> Cache:
    """A cache for a causal LM whose layers hold ``capacity`` positions without reallocating."""
    layer_cls = type("PreallocatedLayerN", (PreallocatedLayer,), {"capacity": capacity})
    return Cache(layer_class_to_replicate=layer_cls)
