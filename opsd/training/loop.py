"""The distillation training loop: setup → steps → save.

Memory: the decoder runs once per micro-batch; the LM head and log-softmax run
on the ``N`` response positions only, ``logit_chunk`` positions at a time under
activation checkpointing, so at most one ``[chunk, V]`` float32 block of logits
is alive in forward *and* backward — memory does not grow with batch × length ×
vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from opsd.config import TrainConfig
from opsd.objectives import divergences as D
from opsd.training.batches import Batch, Example, collate, epoch_order


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


def _chunk_loss(objective: str, temperature: float, ratio_clip, lm_head):
    """Loss of one chunk of response positions; returns (sum loss, stats...)."""

    def fn(h_CH, token_C, teacher_C, behaviour_C, topk_ids_CK, topk_logp_CK, tail_C, weight_C):
        logits_CV = lm_head(h_CH).float()
        if temperature != 1.0:
            logits_CV = logits_CV / temperature
        logp_CV = logits_CV.log_softmax(-1)
        if objective == "forward_kl_topk":
            loss_C, div_C = D.forward_kl_topk(logp_CV, topk_ids_CK, topk_logp_CK, tail_C)
        elif objective == "reverse_kl_sampled":
            loss_C, div_C = D.reverse_kl_sampled(logp_CV, token_C, teacher_C, behaviour_C, ratio_clip)
        else:  # validated by the config; a new objective must be wired here
            raise ValueError(f"unknown objective {objective!r}")
        ent_C = D.entropy(logp_CV)
        return (loss_C * weight_C).sum(), div_C.detach(), ent_C

    return fn


def micro_batch_loss(model, batch: Batch, cfg: TrainConfig, loss_scale: float):
    """Forward + backward of one micro-batch; returns detached per-token stats."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    use_bf16 = cfg.autocast == "bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        hidden_BLH = decoder(input_ids=batch.input_ids_BL, use_cache=False).last_hidden_state
        h_NH = hidden_BLH[batch.row_idx_N, batch.pos_idx_N]
        fn = _chunk_loss(cfg.objective, cfg.temperature, cfg.importance_ratio_clip, lm_head)
        weight_N = torch.ones(batch.n_tokens)
        total = torch.zeros(())
        divs, ents = [], []
        for s in range(0, batch.n_tokens, cfg.logit_chunk):
            sl = slice(s, s + cfg.logit_chunk)
            args = (
                h_NH[sl], batch.token_N[sl], batch.teacher_logp_N[sl], batch.behaviour_logp_N[sl],
                batch.topk_ids_NK[sl], batch.topk_logp_NK[sl], batch.tail_N[sl], weight_N[sl],
            )
            # Recompute the chunk's logits in backward instead of keeping them.
            loss_sum, div_C, ent_C = checkpoint(fn, *args, use_reentrant=False)
            total = total + loss_sum
            divs.append(div_C)
            ents.append(ent_C)
    (total * loss_scale).backward()
    return total.detach(), torch.cat(divs), torch.cat(ents)


class Trainer:
    """Runs optimiser steps over examples; resumable from (weights, optimiser, TrainState)."""

    def __init__(self, model, cfg: TrainConfig, pad_id: int, total_steps: int):
        self.model = model
        self.cfg = cfg
        self.pad_id = pad_id
        self.opt, self.sched = make_optimizer(model, cfg, total_steps)
        self.state = TrainState()

    def step(self, examples: list[Example], epoch: int = 0) -> StepStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        n_tokens = sum(len(e.response_ids) for e in examples)
        sample_ids = [e.sample_id for e in examples]
        losses, divs, ents = [], [], []
        for s in range(0, len(examples), cfg.micro_batch_size):
            mb = collate(examples[s : s + cfg.micro_batch_size], self.pad_id)
            # Token-mean over the whole optimiser batch, however it is split.
            loss, div, ent = micro_batch_loss(self.model, mb, cfg, 1.0 / max(1, n_tokens))
            losses.append(loss)
            divs.append(div)
            ents.append(ent)
        loss = float(sum(losses)) / max(1, n_tokens)
        div = torch.cat(divs)
        if not math.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            raise NumericalError(
                f"non-finite loss {loss} at step {self.state.step + 1}", sample_ids, self.state.step + 1
            )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
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
        self.state.step += 1
        dt = time.perf_counter() - t0
        stats = StepStats(
            step=self.state.step, epoch=epoch, loss=loss, kl=float(div.mean()) if div.numel() else 0.0,
            entropy=float(torch.cat(ents).mean()) if n_tokens else 0.0, grad_norm=grad_norm, lr=lr,
            tokens=n_tokens, tokens_per_s=n_tokens / dt if dt > 0 else 0.0, seconds=dt,
            div_min=float(div.min()) if div.numel() else 0.0,
            div_max=float(div.max()) if div.numel() else 0.0,
        )
        self.state.history.append(stats.as_dict())
        return stats


def plan_batches(n_examples: int, cfg: TrainConfig) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) for every optimiser step, in order. Partial last batches kept."""
    plan = []
    for epoch in range(cfg.epochs):
        order = epoch_order(n_examples, cfg.seed, epoch)
        for s in range(0, n_examples, cfg.batch_size):
            plan.append((epoch, order[s : s + cfg.batch_size]))
    return plan
