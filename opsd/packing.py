"""Prompt-sharing packed layouts: several replies to one prompt in one row, the prompt once.

Training and teacher scoring both run a decoder over ``head + tail`` sequences where many
sequences share their head (the n samples of a question share its prompt; the teacher's
context of a question is the same for all of its samples). Encoding the head once per group
is exact with a block mask: a group ``[head][tail 1][tail 2]…`` is one segment run in which
every tail attends to the head and to itself only, and each tail's position ids continue
from the head's end as if it were alone. Groups are packed first-fit into rows no longer
than the longest group (pads attend only to themselves, so no attention row is empty).

Token ``t`` of tail ``i`` is predicted by the output at the head's last position (``t = 0``)
or at the tail's token ``t - 1``: :meth:`Packed.predicting` gives those columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Packed:
    ids_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    segment_BL: torch.Tensor  # unique per segment within a row; pads: -1 - column
    root_BL: torch.Tensor  # the segment of the token's group head
    place: list[tuple[int, int, int]]  # per item: (row, first column of its tail, end of its head)

    def predicting(self, i: int, n: int) -> tuple[int, np.ndarray]:
        """(row, columns) whose outputs predict the ``n`` tokens of item ``i``'s tail."""
        b, start, head_end = self.place[i]
        return b, np.concatenate([[head_end - 1], np.arange(start, start + n - 1)])[:n].astype(np.int64)


def plain_positions(heads: Sequence[Sequence[int]], tails: Sequence[Sequence[int]]) -> int:
    """Positions one right-padded row per item would compute."""
    return len(heads) * max(len(h) + len(t) for h, t in zip(heads, tails))


def pack(heads: Sequence[Sequence[int]], tails: Sequence[Sequence[int]], pad_id: int) -> Packed | None:
    """The packed layout of ``head_i + tail_i`` items, or ``None`` when it would not compute
    fewer positions than one padded row per item (no head shared, similar lengths)."""
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(heads):
        groups.setdefault(tuple(h), []).append(i)
    size = {g: len(g) + sum(len(tails[i]) for i in members) for g, members in groups.items()}
    L = max(size.values())
    rows: list[list[tuple]] = []
    room: list[int] = []
    for g in sorted(groups, key=lambda g: -size[g]):  # stable: ties keep first appearance
        r = next((j for j, free in enumerate(room) if free >= size[g]), None)
        if r is None:
            rows.append([])
            room.append(L)
            r = len(rows) - 1
        rows[r].append(g)
        room[r] -= size[g]
    if len(rows) * L >= plain_positions(heads, tails):
        return None
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    seg = -1 - torch.arange(L).repeat(B, 1)
    root, pos = seg.clone(), torch.zeros((B, L), dtype=torch.long)
    place: list[tuple[int, int, int] | None] = [None] * len(heads)
    for b, row_groups in enumerate(rows):
        col, n_seg = 0, 0
        for g in row_groups:
            P = len(g)
            ids[b, col : col + P] = torch.tensor(g, dtype=torch.long)
            seg[b, col : col + P] = root[b, col : col + P] = head_seg = n_seg
            pos[b, col : col + P] = torch.arange(P)
            head_end, col, n_seg = col + P, col + P, n_seg + 1
            for i in groups[g]:
                R = len(tails[i])
                ids[b, col : col + R] = torch.tensor(list(tails[i]), dtype=torch.long)
                seg[b, col : col + R] = n_seg
                root[b, col : col + R] = head_seg
                pos[b, col : col + R] = torch.arange(P, P + R)
                place[i] = (b, col, head_end)
                col, n_seg = col + R, n_seg + 1
    return Packed(ids, pos, seg, root, place)  # type: ignore[arg-type]


def allowed(segment_BL: torch.Tensor, root_BL: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """``[B, 1, L, prefix + L]`` bool: query q may attend key k (earlier tokens of its own
    segment and of its group's head; every query sees all ``prefix`` cached positions)."""
    B, L = segment_BL.shape
    causal_LL = torch.ones((L, L), dtype=torch.bool, device=segment_BL.device).tril()
    seg_q, seg_k = segment_BL[:, :, None], segment_BL[:, None, :]
    inner_BLL = ((seg_k == seg_q) | (seg_k == root_BL[:, :, None])) & causal_LL
    if prefix:
        inner_BLL = torch.cat([inner_BLL.new_ones((B, L, prefix)), inner_BLL], dim=-1)
    return inner_BLL[:, None]


def kernel_mask(model: torch.nn.Module, allowed_B1LK: torch.Tensor) -> torch.Tensor:
    """``allowed`` in the form the model's active attention kernel takes: eager adds a float
    mask to the scores, SDPA takes the boolean one."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != "eager":
        return allowed_B1LK
    device = allowed_B1LK.device
    # the scores' dtype: under autocast the bf16 scores + a bf16 mask stay bf16 (an fp32 mask
    # would materialise every [L, K] score block in fp32 before the softmax upcasts anyway)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else next(model.parameters()).dtype
    mask = torch.zeros(allowed_B1LK.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed_B1LK, torch.finfo(dtype).min)


def supports_packing(model: torch.nn.Module) -> bool:
    """A custom 4D mask is understood by the eager and SDPA kernels (not flash-attention)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("eager", "sdpa")
