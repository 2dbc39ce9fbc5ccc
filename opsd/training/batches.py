"""Training examples (student prompt + sampled response + teacher targets) and batching.

Sequences are right-padded: pads then follow every real token, so causal
attention needs no mask and position ids stay ``0..L-1``. The ``N`` response
tokens of a micro-batch are addressed by ``(row_idx_N, pos_idx_N)`` where
``pos`` is the position whose output predicts that token (one before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Example:
    sample_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logp: np.ndarray  # [R]
    teacher_logp: np.ndarray  # [R] teacher log-prob of the sampled token
    topk_ids: np.ndarray  # [R, k] int32
    topk_logp: np.ndarray  # [R, k] float32
    tail: np.ndarray  # [R]
    reward: float = 0.0
    group: str = ""


@dataclass
class Batch:
    sample_ids: list[str]
    input_ids_BL: torch.Tensor
    row_idx_N: torch.Tensor
    pos_idx_N: torch.Tensor
    token_N: torch.Tensor
    tokpos_N: torch.Tensor  # index of the token within its response (0-based)
    resp_len_N: torch.Tensor  # length of the response each token belongs to
    behaviour_logp_N: torch.Tensor
    teacher_logp_N: torch.Tensor
    topk_ids_NK: torch.Tensor
    topk_logp_NK: torch.Tensor
    tail_N: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.token_N.numel())


def collate(examples: list[Example], pad_id: int) -> Batch:
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    rows, poss, toks, tokpos, rlen = [], [], [], [], []
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        p, r = len(e.prompt_ids), len(e.response_ids)
        rows.append(np.full(r, b))
        poss.append(np.arange(p - 1, p - 1 + r))
        toks.append(np.asarray(e.response_ids))
        tokpos.append(np.arange(r))
        rlen.append(np.full(r, r))

    def cat(parts, dtype):
        return torch.from_numpy(np.concatenate(parts).astype(dtype))

    return Batch(
        sample_ids=[e.sample_id for e in examples],
        input_ids_BL=ids,
        row_idx_N=cat(rows, np.int64),
        pos_idx_N=cat(poss, np.int64),
        token_N=cat(toks, np.int64),
        tokpos_N=cat(tokpos, np.int64),
        resp_len_N=cat(rlen, np.int64),
        behaviour_logp_N=cat([e.behaviour_logp for e in examples], np.float32),
        teacher_logp_N=cat([e.teacher_logp for e in examples], np.float32),
        topk_ids_NK=cat([e.topk_ids for e in examples], np.int64),
        topk_logp_NK=cat([e.topk_logp for e in examples], np.float32),
        tail_N=cat([e.tail for e in examples], np.float32),
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle for (seed, epoch): a resumed run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n).tolist()
