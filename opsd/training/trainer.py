"""The optimiser loop: setup → steps → save, resumable from (weights, optimiser, TrainState).

One :meth:`Trainer.step` is an optimiser batch: micro-batches through
:func:`opsd.training.loss.micro_batch_loss` (token-mean over the whole batch however it is split,
also across data-parallel ranks), gradient clipping, fused AdamW, the LR schedule.

Precision: fp32 master weights and AdamW state, the forward and backward under bf16 autocast
(``train.autocast``). The alternative, bf16 weights with the optimiser keeping fp32 copies, holds
the same bytes per parameter and saves autocast's casts, but a bf16 weight itself cannot take an
update smaller than 2^-8 of its magnitude: with lr 5e-5 most of a model's updates are that small,
and ``bench/precision.py`` measures how many elements such a step silently drops. Pure bf16
(weights and moments) drops them outright. The model trains wherever its weights are (the pool
put them on the run's device); the fused AdamW kernel runs on CPU and CUDA alike.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from opsd.config import TrainConfig
from opsd.memory import release_free_memory
from opsd.packing import supports_packing
from opsd.training.batches import Example, collate, epoch_order
from opsd.training.loss import LiveTeacher, micro_batch_loss, reviser_nll
from opsd.training.lora import add_adapters
from opsd.training.memory import Checkpointing


class NumericalError(FloatingPointError):
    """A non-finite loss or gradient; carries the ids of the offending batch."""

    def __init__(self, message: str, sample_ids: list[str], step: int):
        super().__init__(message)
        self.sample_ids = sample_ids
        self.step = step


@dataclass
class StepStats:
    step: int
    epoch: int
    loss: float
    kl: float
    entropy: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_s: float
    seconds: float
    div_min: float
    div_max: float
    # objective-specific: distill_fraction, pg_fraction, selected_fraction, kl_weight, ...
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def select_trainable(model: torch.nn.Module, pattern: str | None) -> tuple[int, int]:
    """Freeze every parameter whose name ``pattern`` does not find (``re.search``; None: train
    all). Returns (trainable, total) element counts. Frozen parameters get no gradient and no
    AdamW moments, so they stay exactly at the base weights."""
    params = dict(model.named_parameters())  # tied weights once, under their first name
    if pattern is not None:
        chosen = {name for name in params if re.search(pattern, name)}
        if not chosen:
            sample = ", ".join(list(params)[:4])
            raise ValueError(f"train.trainable {pattern!r} finds none of the model's "
                             f"{len(params)} parameter names (e.g. {sample})")
        for name, p in params.items():
            p.requires_grad_(name in chosen)
    total = sum(p.numel() for p in params.values())
    return sum(p.numel() for p in params.values() if p.requires_grad), total


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: 0.10 s instead of 0.54 s per step for SmolLM2-135M on 2 CPU cores
    # (the default per-tensor loop was ~10 % of a quickstart step); same update up to rounding.
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` every decoder layer in place (dynamic shapes: micro-batches change
    length). Per layer rather than the whole model: the loss calls the decoder and the chunked LM
    head itself, and layer units are what FSDP and checkpointing wrap. Returns how many."""
    layers = list(getattr(model.get_decoder(), "layers", []))
    # OPSD_COMPILE_BACKEND: another torch.compile backend ("eager": tracing only, what the CPU
    # test uses to check the wiring in seconds rather than minutes of C++ compilation)
    backend = os.environ.get("OPSD_COMPILE_BACKEND", "inductor")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


class Trainer:
    """Runs optimiser steps over examples; resumable from (weights, optimiser, TrainState).

    ``teacher_model``: the teacher for live-teacher objectives (``train.live_teacher``); its
    examples must carry ``teacher_context_ids``.
    """

    def __init__(self, model, cfg: TrainConfig, pad_id: int, total_steps: int,
                 teacher_model: torch.nn.Module | None = None, teacher_batch_size: int = 32,
                 share_prefix: bool = True, dist=None, forward: torch.nn.Module | None = None):
        """``dist``: an :class:`opsd.training.distributed.DataParallel` (this rank trains on its
        share of every batch through a DDP- or FSDP2-wrapped loss module); ``forward``: that
        module when the caller built it already (FSDP's sharded load)."""
        self.model = model
        # before DDP/FSDP wrap the model and the optimiser collects its parameters
        if cfg.lora.enabled:
            add_adapters(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.seed)
        self.n_trainable, self.n_params = select_trainable(model, cfg.trainable)
        self.device = dist.device if dist is not None else next(model.parameters()).device
        # recompute decoder layers in backward: always, never, or (auto) when a micro-batch's
        # activations would not fit the device (opsd.training.memory)
        self.checkpointing = Checkpointing(cfg.activation_checkpointing, model, self.device)
        if cfg.compile:
            compile_layers(model)
        self.pack = cfg.share_prompts and supports_packing(model)
        self.dist = dist
        self.cfg = cfg
        self.pad_id = pad_id
        self.total_steps = max(1, total_steps)
        self.forward = forward
        if dist is not None and forward is None:
            # before the optimiser is built: under FSDP, AdamW holds (and shards its moments
            # like) the sharded parameters
            self.forward = dist.wrap(model)
        self.opt, self.sched = make_optimizer(model, cfg, total_steps)
        self.state = TrainState()
        self.teacher = (LiveTeacher(teacher_model, teacher_batch_size, share_prefix)
                        if teacher_model is not None else None)

    def step(self, examples: list[Example], epoch: int = 0,
             revisions: list[Example] | None = None) -> StepStats:
        """One optimiser step on ``examples``; with ``revisions`` (SD-Zero's passing revisions,
        ``train.reviser``) the step minimises ``main + weight · reviser NLL``, each term the mean
        over its own tokens (:meth:`_reviser_backward`)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        # tokens of the whole optimiser batch (all ranks): the loss is their mean however split
        n_tokens = sum(len(e.response_ids) for e in examples)
        sample_ids = [e.sample_id for e in examples]
        progress = self.state.step / self.total_steps
        losses, divs, ents = [], [], []
        info_sum: dict[str, float] = {}
        local = self.dist.shard(examples) if self.dist else examples
        micro = [local[s : s + cfg.micro_batch_size] for s in range(0, len(local), cfg.micro_batch_size)]
        n_real = len(micro)
        if self.dist:
            # FSDP gathers and reduces inside every forward/backward (collectives): all ranks run
            # the same number of micro-batches; with DDP at least one, whose backward reduces
            # (same metric names on every rank). A rank short of a ragged last batch runs a copy
            # of the batch's first example with loss weight 0: a zero gradient, its statistics
            # dropped.
            want = int(self.dist.max(len(micro))) if self.dist.sharded else 1
            micro += [examples[:1]] * max(0, want - len(micro))
        for m, part in enumerate(micro):
            mb = collate(part, self.pad_id, pack=self.pack)
            self.checkpointing.before(int(mb.input_ids_BL.numel()))
            # Token-mean over the whole optimiser batch, however it is split.
            scale = 1.0 / max(1, n_tokens) if m < n_real else 0.0
            # DDP: gradients stay local until the batch's last micro-batch, whose backward
            # all-reduces them bucket by bucket while it runs
            sync = self.dist.accumulating(self.forward, last=m == len(micro) - 1) if self.dist \
                else contextlib.nullcontext()
            with sync:
                loss, div, ent, info = micro_batch_loss(self.model, mb, cfg, scale,
                                                        teacher=self.teacher, progress=progress,
                                                        forward=self.forward)
            for k, v in info.items():  # token-weighted average over micro-batches
                info_sum[k] = info_sum.get(k, 0.0) + (v * mb.n_tokens if m < n_real else 0.0)
            if m < n_real:
                losses.append(loss)
                divs.append(div)
                ents.append(ent)
        loss = float(sum(losses)) / max(1, n_tokens)
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731  (a rank without examples)
        div, ent = cat(divs), cat(ents)
        div_stats = (float(div.sum()), float(div.numel()), float(div.min()) if div.numel() else math.inf,
                     float(div.max()) if div.numel() else -math.inf, float(ent.sum()))
        if self.dist:
            # The backward has summed every rank's (1/n_tokens-scaled) gradients already (DDP's
            # reducer, FSDP's reduce-scatter): the one-process gradient.
            loss = self.dist.sum([loss])[0]
            info_sum = dict(zip(sorted(info_sum), self.dist.sum([info_sum[k] for k in sorted(info_sum)])))
            d_sum, d_n, e_sum = self.dist.sum([div_stats[0], div_stats[1], div_stats[4]])
            div_stats = (d_sum, d_n, self.dist.min(div_stats[2]), self.dist.max(div_stats[3]), e_sum)
        reviser: dict = {}
        if cfg.reviser.enabled:
            rev_loss, rev_tokens = self._reviser_backward(revisions or [])
            reviser = {"reviser_loss": rev_loss, "reviser_tokens": rev_tokens}
            if rev_loss is not None:
                loss += cfg.reviser.weight * rev_loss
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            raise NumericalError(
                f"non-finite loss {loss} at step {self.state.step + 1}", sample_ids, self.state.step + 1
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor, the global norm
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            self.opt.zero_grad(set_to_none=True)
            raise NumericalError(
                f"non-finite gradient norm at step {self.state.step + 1}", sample_ids,
                self.state.step + 1,
            )
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        release_free_memory()  # a step frees GBs in changing shapes: no creep over a long run
        self.state.step += 1
        dt = time.perf_counter() - t0
        stats = StepStats(
            step=self.state.step, epoch=epoch, loss=loss,
            kl=div_stats[0] / div_stats[1] if div_stats[1] else 0.0,
            entropy=div_stats[4] / n_tokens if n_tokens else 0.0, grad_norm=grad_norm, lr=lr,
            tokens=n_tokens, tokens_per_s=n_tokens / dt if dt > 0 else 0.0, seconds=dt,
            div_min=div_stats[2] if div_stats[1] else 0.0,
            div_max=div_stats[3] if div_stats[1] else 0.0,
            extra={**{k: v / max(1, n_tokens) for k, v in info_sum.items()}, **reviser},
        )
        self.state.history.append(stats.as_dict())
        return stats

    def _reviser_backward(self, revisions: list[Example]) -> tuple[float | None, int]:
        """SD-Zero's reviser term, its gradient accumulated into the step's:

            weight · (1/|R|) Σ_{ŷ ∈ revisions} Σ_t −log πθ(ŷ_t | c, ŷ_<t)

        (``|R|`` the revisions' tokens; a mean of its own, so the main term's scale does not
        depend on how many revisions passed). Returns (mean NLL per token, |R|); (None, 0)
        without revisions."""
        n = sum(len(e.response_ids) for e in revisions)
        if not n:
            return None, 0
        if self.dist is not None:
            raise NotImplementedError("train.reviser is online-only (one process)")
        total = 0.0
        mbs = self.cfg.micro_batch_size
        for s in range(0, len(revisions), mbs):
            mb = collate(revisions[s : s + mbs], self.pad_id, pack=self.pack)
            self.checkpointing.before(int(mb.input_ids_BL.numel()))
            total += float(reviser_nll(self.model, mb, self.cfg, self.cfg.reviser.weight / n))
        return total / n, n


def plan_batches(n_examples: int, cfg: TrainConfig,
                 groups: list[str] | None = None) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) for every optimiser step, in order. Partial last batches kept.

    ``batch_order: grouped`` shuffles the groups (``groups[i]``: the question of example i)
    instead of the examples, keeping each question's samples adjacent, so they share their
    prompt in a packed micro-batch."""
    plan = []
    for epoch in range(cfg.epochs):
        if cfg.batch_order == "grouped" and groups is not None:
            members: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            keys = list(members)
            order = [i for gi in epoch_order(len(keys), cfg.seed, epoch) for i in members[keys[gi]]]
        else:
            order = epoch_order(n_examples, cfg.seed, epoch)
        for s in range(0, n_examples, cfg.batch_size):
            plan.append((epoch, order[s : s + cfg.batch_size]))
    return plan
