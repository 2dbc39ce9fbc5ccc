"""Training examples (student prompt + sampled response + teacher targets) and batching.

Two layouts of a micro-batch, both addressing its ``N`` response tokens by
``(row_idx_N, pos_idx_N)`` where ``pos`` is the position whose output predicts
that token (one before it); the tokens of one reply are contiguous and in order.

* **plain**: one right-padded row per example. Pads follow every real token, so
  causal attention needs no mask and position ids stay ``0..L-1``.
* **packed** (:func:`collate` with ``pack=True``, layout in :mod:`opsd.packing`):
  the samples of one question share their prompt — ``[prompt][reply 1][reply 2]…``,
  each reply attending to the prompt and to itself only — and groups are
  packed into rows first-fit. With 4 samples per question the
  prompt is encoded once instead of 4 times and most of the padding goes: the
  online TRL-matched step (16 replies, 37-token prompts, ≤ 48-token replies)
  computes about half the tokens. The result is the plain layout's up to
  floating-point rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from opsd import packing


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
    # --- reward mixing (filled by stages.train.load_examples over the whole artifact)
    passed: bool | None = None
    advantage: float = 0.0  # group-normalised GRPO advantage of this sample
    scope_weight: float = 1.0  # SCOPE group-softmax weight of this sample
    # --- TRACE spans: per response token, inside a key / error span
    key_mask: np.ndarray | None = None  # [R] bool
    error_mask: np.ndarray | None = None  # [R] bool
    # --- live teacher: the teacher's prompt ids (privileged context + the student's turns)
    teacher_context_ids: list[int] | None = field(default=None, repr=False)
    # --- G-OPD: the reference model's log-prob of each sampled token (teacher.reference)
    reference_logp: np.ndarray | None = None  # [R]
    # --- CEPO: the wrong-answer teacher's log-prob of each sampled token (teacher.negative_view)
    negative_logp: np.ndarray | None = None  # [R]
    # --- BRTS: the distillation weight of the whole sample (train.weighting.teacher_reply on a
    # reply the teacher wrote, 1 on the student's own)
    sample_weight: float = 1.0
    # BRTS: a reply the teacher wrote is no member of the student's GRPO group (a group of its
    # own: advantage 0)
    teacher_written: bool = False


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
    passed_N: torch.Tensor | None = None  # bool; None when no sample has a verdict
    advantage_N: torch.Tensor | None = None  # the sample's GRPO advantage, per token
    scope_weight_N: torch.Tensor | None = None
    key_N: torch.Tensor | None = None  # bool
    error_N: torch.Tensor | None = None  # bool
    reference_logp_N: torch.Tensor | None = None  # G-OPD's pRef; None: the behaviour policy
    negative_logp_N: torch.Tensor | None = None  # CEPO's log pT-; None: no negative pass
    sample_weight_N: torch.Tensor | None = None  # BRTS: the sample's distillation weight
    examples: list[Example] = field(default_factory=list, repr=False)
    seq_N: torch.Tensor | None = None  # index of each token's example in the batch
    # packed layout only (None in the plain one): per position, its RoPE position, its segment
    # (unique within the row; pads get a unique negative one) and the segment of its group's
    # prompt — a token sees the earlier tokens of its own segment and of its prompt
    position_ids_BL: torch.Tensor | None = None
    segment_BL: torch.Tensor | None = None
    root_BL: torch.Tensor | None = None

    def attention_allowed(self) -> torch.Tensor | None:
        """``[B, 1, L, L]`` bool, True where query position q may attend key position k
        (packed layout; ``None`` for the plain one, whose causal mask is implicit)."""
        return None if self.segment_BL is None else packing.allowed(self.segment_BL, self.root_BL)

    @property
    def n_tokens(self) -> int:
        return int(self.token_N.numel())

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on ``device`` (a no-op on CPU)."""
        if device.type == "cpu":
            return self
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in self.__dict__.items()}
        return Batch(**moved)


def _plain_layout(examples: list[Example], pad_id: int):
    L = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    rows, poss = [], []
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        p, r = len(e.prompt_ids), len(e.response_ids)
        rows.append(np.full(r, b))
        poss.append(np.arange(p - 1, p - 1 + r))
    return ids, rows, poss, None


def _packed_layout(examples: list[Example], pad_id: int):
    packed = packing.pack([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id)
    if packed is None:
        return None
    rows, poss = [], []
    for i, e in enumerate(examples):
        b, cols = packed.predicting(i, len(e.response_ids))
        rows.append(np.full(len(cols), b))
        poss.append(cols)
    return packed.ids_BL, rows, poss, (packed.position_ids_BL, packed.segment_BL, packed.root_BL)


def collate(examples: list[Example], pad_id: int, pack: bool = False) -> Batch:
    """A micro-batch in the plain layout, or packed (``pack``) when that computes fewer
    positions (samples of one question present together)."""
    layout = _packed_layout(examples, pad_id) if pack else None
    ids, rows, poss, packed = layout or _plain_layout(examples, pad_id)
    toks, tokpos, rlen, seqs = [], [], [], []
    for i, e in enumerate(examples):
        r = len(e.response_ids)
        toks.append(np.asarray(e.response_ids))
        tokpos.append(np.arange(r))
        rlen.append(np.full(r, r))
        seqs.append(np.full(r, i))

    def cat(parts, dtype):
        return torch.from_numpy(np.concatenate(parts).astype(dtype))

    def per_token(values, dtype):
        return cat([np.full(len(e.response_ids), v) for e, v in zip(examples, values)], dtype)

    def masks(name):
        if all(getattr(e, name) is None for e in examples):
            return None
        return cat([getattr(e, name) if getattr(e, name) is not None
                    else np.zeros(len(e.response_ids), dtype=bool) for e in examples], np.bool_)

    has_verdict = any(e.passed is not None for e in examples)
    with_ref = [e.reference_logp is not None for e in examples]
    if any(with_ref) and not all(with_ref):
        raise ValueError("some examples of the batch have reference log-probs and some do not")
    with_neg = [e.negative_logp is not None for e in examples]
    if any(with_neg) and not all(with_neg):
        raise ValueError("some examples of the batch have negative log-probs and some do not")
    return Batch(
        sample_ids=[e.sample_id for e in examples],
        input_ids_BL=ids,
        row_idx_N=cat(rows, np.int64),
        seq_N=cat(seqs, np.int64),
        position_ids_BL=packed[0] if packed else None,
        segment_BL=packed[1] if packed else None,
        root_BL=packed[2] if packed else None,
        pos_idx_N=cat(poss, np.int64),
        token_N=cat(toks, np.int64),
        tokpos_N=cat(tokpos, np.int64),
        resp_len_N=cat(rlen, np.int64),
        behaviour_logp_N=cat([e.behaviour_logp for e in examples], np.float32),
        teacher_logp_N=cat([e.teacher_logp for e in examples], np.float32),
        topk_ids_NK=cat([e.topk_ids for e in examples], np.int64),
        topk_logp_NK=cat([e.topk_logp for e in examples], np.float32),
        tail_N=cat([e.tail for e in examples], np.float32),
        passed_N=per_token([bool(e.passed) for e in examples], np.bool_) if has_verdict else None,
        advantage_N=per_token([e.advantage for e in examples], np.float32),
        scope_weight_N=per_token([e.scope_weight for e in examples], np.float32),
        key_N=masks("key_mask"),
        error_N=masks("error_mask"),
        reference_logp_N=(cat([e.reference_logp for e in examples], np.float32)
                          if with_ref and all(with_ref) else None),
        negative_logp_N=(cat([e.negative_logp for e in examples], np.float32)
                         if with_neg and all(with_neg) else None),
        sample_weight_N=(per_token([e.sample_weight for e in examples], np.float32)
                         if any(e.sample_weight != 1.0 for e in examples) else None),
        examples=list(examples),
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle for (seed, epoch): a resumed run sees the same order."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n).tolist()
