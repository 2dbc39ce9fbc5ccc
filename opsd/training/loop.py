"""The distillation training loop: setup → steps → save.

Memory: the decoder runs once per micro-batch; the LM head and log-softmax run
on the ``N`` response positions only, ``logit_chunk`` positions at a time under
activation checkpointing, so only one chunk's ``[chunk, V]`` float32 logits (and
the temporaries of that chunk's loss) are alive in forward *and* backward —
memory does not grow with batch × length × vocabulary. A live teacher's logits
are computed the same way, chunk by chunk, from its stored hidden states.

Each token's loss combines the configured divergence with the reward terms, with
coefficients from :mod:`opsd.objectives.plan` (weighting, selection, routing).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from opsd.config import TrainConfig
from opsd.memory import release_free_memory
from opsd.objectives import divergences as D
from opsd.objectives.plan import TokenStats, needs_stats, token_coefficients
from opsd.packing import kernel_mask, supports_packing
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: 0.10 s instead of 0.54 s per step for SmolLM2-135M on 2 CPU cores
    # (the default per-tensor loop was ~10 % of a quickstart step); same update up to rounding.
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


class LiveTeacher:
    """The teacher run during training (live-teacher objectives: ``jsd``, student-support top-k).

    Per micro-batch its decoder reads ``teacher context + response`` for every sample (contexts
    grouped and a shared privileged prefix encoded once, as in the teacher stage); its final
    hidden states at the response positions are kept (``[N, H]``, small) and its LM head runs
    chunk by chunk next to the student's, so at most one ``[chunk, V]`` float32 block of
    teacher logits is alive. No gradient ever reaches the teacher.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int = 32, share_prefix: bool = True):
        from opsd.backends.hf import HFScorer

        self.model = model
        self.scorer = HFScorer(model, batch_size=batch_size, share_prefix=share_prefix)
        self.lm_head = model.get_output_embeddings()

    @torch.no_grad()
    def hidden(self, batch: Batch) -> torch.Tensor:
        contexts = [e.teacher_context_ids for e in batch.examples]
        if any(c is None for c in contexts):
            raise ValueError(
                "a live-teacher objective needs the teacher's context ids (contexts.parquet in the "
                "teacher artifact); rerun the teacher stage with this version of opsd"
            )
        hs = self.scorer._hidden(contexts, [e.response_ids for e in batch.examples], None)
        return torch.cat(hs) if hs else torch.zeros((0, 0))


def _teacher_logp(teacher_head, th_CH: torch.Tensor, temperature: float) -> torch.Tensor:
    """The live teacher's log-softmax on one chunk, built in place: one fp32 ``[C, V]`` block."""
    with torch.no_grad():
        logits_CV = teacher_head(th_CH).float()
        if temperature != 1.0:
            logits_CV.div_(temperature)
        return logits_CV.sub_(logits_CV.logsumexp(-1, keepdim=True))


def _student_logits(lm_head, h_CH: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's logits of one chunk as an fp32 block of its own (tempered in place)."""
    z_CV = lm_head(h_CH).float()
    if temperature != 1.0:
        z_CV = z_CV.div_(temperature)
    return z_CV


def _student_topk_k(cfg: TrainConfig, topk_ids_CK: torch.Tensor) -> int:
    return cfg.divergence.topk or int(topk_ids_CK.shape[-1])


class StudentRows:
    """The student's log-probs of one chunk, as much as the loss reads.

    Every objective but ``jsd`` reads a few ids per token — the sampled token, the teacher's
    cached top-k, the student's own top-k — so the rows are gathered by
    :func:`opsd.objectives.divergences.gathered_log_softmax`, which keeps the fp32 logits
    block as the only ``[C, V]`` tensor for the backward. ``jsd`` needs the full rows.
    """

    def __init__(self, z_CV, token_C, topk_ids_CK, student_ids_CK=None, full: bool = False,
                 inplace: bool = True):
        self.student_ids_CK = student_ids_CK
        self.full_CV = None
        if full:
            self.entropy_C = D.entropy_from_logits(z_CV)
            self.full_CV = D.log_softmax_rows(z_CV, inplace=inplace)
            g = lambda ids: self.full_CV.gather(-1, ids.long())  # noqa: E731
            self.token_C, self.topk_CK = g(token_C[:, None]).squeeze(-1), g(topk_ids_CK)
            self.student_CK = g(student_ids_CK) if student_ids_CK is not None else None
            return
        parts = [token_C[:, None], topk_ids_CK] + ([student_ids_CK] if student_ids_CK is not None else [])
        lp_CG, lse_C = D.gathered_log_softmax(z_CV, torch.cat([x.long() for x in parts], -1), inplace)
        # the forward leaves z intact (only the backward consumes it): share its log-sum-exp
        self.entropy_C = D.entropy_from_logits(z_CV, lse_C)
        k = topk_ids_CK.shape[-1]
        self.token_C, self.topk_CK = lp_CG[:, 0], lp_CG[:, 1 : 1 + k]
        self.student_CK = lp_CG[:, 1 + k :] if student_ids_CK is not None else None


def _student_rows(cfg: TrainConfig, z_CV, token_C, topk_ids_CK, main: bool, inplace: bool = True):
    """Rows for a chunk whose loss includes the main divergence (``main``) or not."""
    obj, d = cfg.objective, cfg.divergence
    sids = None
    if main and obj in ("forward_kl_topk", "reverse_kl_topk") and d.topk_support == "student":
        sids = D.student_topk(z_CV, _student_topk_k(cfg, topk_ids_CK))  # same order as log-probs
    return StudentRows(z_CV, token_C, topk_ids_CK, sids, full=main and obj == "jsd", inplace=inplace)


def main_divergence(cfg: TrainConfig, rows: StudentRows, t_logp_CV, teacher_C, behaviour_C,
                    topk_logp_CK, tail_C, inplace: bool = False):
    """``(loss_C, div_C)`` of ``cfg.objective`` on one chunk (see opsd.objectives.divergences)."""
    d, obj = cfg.divergence, cfg.objective
    if obj in ("forward_kl_topk", "reverse_kl_topk"):
        if d.topk_support == "student":
            s_CK, t_CK, tail = rows.student_CK, t_logp_CV.gather(-1, rows.student_ids_CK), None
        else:
            s_CK, t_CK, tail = rows.topk_CK, topk_logp_CK, tail_C
        fn = D.forward_kl_topk_gathered if obj == "forward_kl_topk" else D.reverse_kl_topk_gathered
        return fn(s_CK, t_CK, tail, tail=d.topk_tail, clip=d.clip, clip_mode=d.clip_mode)
    if obj == "reverse_kl_sampled":
        baseline_C = None
        if cfg.advantage.baseline == "vopd":
            # V_t = -KL(pS||pT) on the teacher's top-k + tail (detached)
            baseline_C = -D.reverse_kl_topk_gathered(rows.topk_CK.detach(), topk_logp_CK, tail_C)[0]
        return D.reverse_kl_sampled_gathered(rows.token_C, teacher_C, behaviour_C,
                                             cfg.importance_ratio_clip,
                                             reward_scale=cfg.advantage.reward_scale,
                                             baseline_N=baseline_C, clip=d.clip)
    if obj == "jsd":
        # inplace: the chunk's teacher block is recomputed per chunk and read by nothing else
        return D.generalized_jsd(rows.full_CV, t_logp_CV, d.jsd_beta, clip=d.clip,
                                 clip_mode=d.clip_mode, inplace=inplace)
    if obj == "nll":
        return -rows.token_C, -rows.token_C.detach()
    raise ValueError(f"objective {obj!r} has no divergence")  # 'none' never reaches here


def _chunk_loss(cfg: TrainConfig, lm_head, teacher_head):
    """Loss of one chunk of response positions: (sum of weighted token losses, div_C, entropy_C)."""
    T = cfg.temperature
    d = cfg.divergence

    def fn(h_CH, th_CH, token_C, teacher_C, behaviour_C, topk_ids_CK, topk_logp_CK, tail_C,
           distill_C, fkl_C, rkl_C, pg_C):
        z_CV = _student_logits(lm_head, h_CH, T)
        rows = _student_rows(cfg, z_CV, token_C, topk_ids_CK, main=distill_C is not None)
        del z_CV  # owned by the rows (or freed once the full log-probs exist)
        # the teacher's block only now: never three [C, V] blocks (logits, log-probs, teacher)
        t_logp_CV = _teacher_logp(teacher_head, th_CH, T) if th_CH is not None else None
        total = rows.token_C.new_zeros(())
        if distill_C is not None:
            loss_C, div_C = main_divergence(cfg, rows, t_logp_CV, teacher_C, behaviour_C,
                                            topk_logp_CK, tail_C, inplace=True)
            total = total + (loss_C * distill_C).sum()
        else:
            div_C = rows.token_C.detach() - teacher_C  # sampled k1 estimate, for logging
        if fkl_C is not None:
            loss_C, _ = D.forward_kl_topk_gathered(rows.topk_CK, topk_logp_CK, tail_C, tail=d.topk_tail)
            total = total + (loss_C * fkl_C).sum()
        if rkl_C is not None:
            loss_C, _ = D.reverse_kl_topk_gathered(rows.topk_CK, topk_logp_CK, tail_C, tail=d.topk_tail)
            total = total + (loss_C * rkl_C).sum()
        if pg_C is not None:
            total = total + D.policy_gradient(rows.token_C, behaviour_C, pg_C,
                                              ppo_clip=cfg.rewards.ppo_clip,
                                              ratio_clip=cfg.importance_ratio_clip).sum()
        return total, div_C.detach(), rows.entropy_C

    return fn


@torch.no_grad()
def token_stats(cfg: TrainConfig, lm_head, teacher_head, h_NH, th_NH, batch: Batch) -> TokenStats:
    """No-grad pass over the response positions: the current student's entropy and divergence
    (and a live teacher's entropy), chunk by chunk — inputs of TIP selection and entropy weights."""
    T = cfg.temperature
    # TIP ranks by the divergence itself, not its clipped value.
    unclipped = cfg.model_copy(update={"divergence": cfg.divergence.model_copy(update={"clip": None})})
    sampled = cfg.objective in ("reverse_kl_sampled", "nll", "none")
    ents, divs, tents = [], [], []
    for s in range(0, batch.n_tokens, cfg.logit_chunk):
        sl = slice(s, s + cfg.logit_chunk)
        z_CV = _student_logits(lm_head, h_NH[sl], T)
        t_logp_CV = _teacher_logp(teacher_head, th_NH[sl], T) if th_NH is not None else None
        ids_CK, t_CK, tail_C = batch.topk_ids_NK[sl], batch.topk_logp_NK[sl], batch.tail_N[sl]
        rows = _student_rows(unclipped, z_CV, batch.token_N[sl], ids_CK, main=not sampled, inplace=False)
        if sampled:
            # per-token value of the reverse KL on the teacher's top-k + tail (k1 is only unbiased
            # in expectation, a poor ranking signal)
            div_C = D.reverse_kl_topk_gathered(rows.topk_CK, t_CK, tail_C)[0]
        else:
            div_C = main_divergence(unclipped, rows, t_logp_CV, batch.teacher_logp_N[sl],
                                    batch.behaviour_logp_N[sl], t_CK, tail_C)[1]
        ents.append(rows.entropy_C)
        divs.append(div_C.float())
        if t_logp_CV is not None:
            tents.append(D.entropy(t_logp_CV))
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
    return TokenStats(cat(ents), cat(divs), cat(tents) if th_NH is not None else None)


# Padded length up to which `attention: auto` picks eager attention (see TrainConfig.attention).
EAGER_MAX_LEN = 192


@contextmanager
def attention_kernel(model, cfg: TrainConfig, seq_len: int):
    """Use the configured attention implementation for one forward + backward, restored
    afterwards (with layer checkpointing the recompute in backward must use the forward's)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    want = cfg.attention
    if want == "auto":
        want = "eager" if seq_len <= EAGER_MAX_LEN else "sdpa"
    if current is None or current == want or current not in ("sdpa", "eager"):
        yield  # a model without the switch, or a kernel the user chose (e.g. flash_attention_2)
        return
    config._attn_implementation = want
    try:
        yield
    finally:
        config._attn_implementation = current


def decoder_inputs(model, batch: Batch) -> dict:
    """Keyword arguments of the decoder's forward for this batch's layout: a packed batch adds
    its position ids and its block mask (in the active attention kernel's form)."""
    kw = {"input_ids": batch.input_ids_BL, "use_cache": False}
    allowed_B1LL = batch.attention_allowed()
    if allowed_B1LL is not None:
        kw.update(attention_mask=kernel_mask(model, allowed_B1LL), position_ids=batch.position_ids_BL)
    return kw


def micro_batch_loss(model, batch: Batch, cfg: TrainConfig, loss_scale: float, *,
                     teacher: LiveTeacher | None = None, progress: float = 0.0,
                     forward: "LossModule | None" = None):
    """Forward + backward of one micro-batch; returns (loss sum, div_N, entropy_N, info).

    ``forward``: the :class:`LossModule` around ``model`` when it is FSDP-sharded (its forward
    hooks gather the parameters); by default the loss is computed on ``model`` directly.
    """
    with attention_kernel(model, cfg, batch.input_ids_BL.shape[1]):
        if forward is None:
            total, div, ent, info = _micro_batch_forward(model, batch, cfg, teacher=teacher,
                                                         progress=progress)
        else:
            total, div, ent, info = forward(batch, cfg, teacher=teacher, progress=progress)
        if total.requires_grad:
            (total * loss_scale).backward()
    return total.detach(), div, ent, info


class LossModule(torch.nn.Module):
    """A module whose forward is the whole micro-batch loss of ``model`` (FSDP's root unit).

    The loss calls the decoder and the LM head itself, not ``model(...)``. FSDP2 gathers a unit's
    parameters and reduce-scatters their gradients from the hooks of the module it wraps: wrapping
    this module puts the embeddings (= tied LM head) and the final norm in a unit whose hooks run
    around every use of them, the chunked LM head's recomputation in backward included.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, cfg: TrainConfig, *, teacher: LiveTeacher | None = None,
                progress: float = 0.0):
        # every rank must run the backward (its reduce-scatters are collectives), also when no
        # token of its micro-batch has a loss weight: keep_graph gives a zero loss on the decoder
        return _micro_batch_forward(self.model, batch, cfg, teacher=teacher, progress=progress,
                                    keep_graph=True)


def _micro_batch_forward(model, batch: Batch, cfg: TrainConfig, *, teacher: LiveTeacher | None,
                         progress: float, keep_graph: bool = False):
    """Forward of one micro-batch: (loss sum with its graph, div_N, entropy_N, info)."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    th_NH, teacher_head = None, None
    if cfg.live_teacher:
        if teacher is None:
            raise ValueError(f"objective {cfg.objective!r} (topk_support="
                             f"{cfg.divergence.topk_support}) needs a live teacher model")
        th_NH, teacher_head = teacher.hidden(batch), teacher.lm_head
    use_bf16 = cfg.autocast == "bfloat16"
    device = next(model.parameters()).device
    plan_batch, batch = batch, batch.to(device)  # coefficients are planned on the CPU copy
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        hidden_BLH = decoder(**decoder_inputs(model, batch)).last_hidden_state
        h_NH = hidden_BLH[batch.row_idx_N, batch.pos_idx_N]
        stats = None
        if needs_stats(cfg):
            stats = token_stats(cfg, lm_head, teacher_head, h_NH.detach(), th_NH, batch)
        if stats is not None and device.type != "cpu":
            stats = TokenStats(*(None if x is None else x.cpu() for x in
                                 (stats.student_entropy_N, stats.div_N, stats.teacher_entropy_N)))
        coef = token_coefficients(plan_batch, cfg, stats, progress)
        if device.type != "cpu":
            for name in ("distill_N", "fkl_N", "rkl_N", "pg_N"):
                if getattr(coef, name) is not None:
                    setattr(coef, name, getattr(coef, name).to(device))
        fn = _chunk_loss(cfg, lm_head, teacher_head)
        total = torch.zeros(())
        divs, ents = [], []

        def part(x, sl):
            return None if x is None else x[sl]

        for s in range(0, batch.n_tokens, cfg.logit_chunk):
            sl = slice(s, s + cfg.logit_chunk)
            args = (
                h_NH[sl], part(th_NH, sl), batch.token_N[sl], batch.teacher_logp_N[sl],
                batch.behaviour_logp_N[sl], batch.topk_ids_NK[sl], batch.topk_logp_NK[sl],
                batch.tail_N[sl], part(coef.distill_N, sl), part(coef.fkl_N, sl),
                part(coef.rkl_N, sl), part(coef.pg_N, sl),
            )
            # Recompute the chunk's logits in backward instead of keeping them.
            loss_sum, div_C, ent_C = checkpoint(fn, *args, use_reentrant=False)
            total = total + loss_sum
            divs.append(div_C)
            ents.append(ent_C)
    if keep_graph and not total.requires_grad:
        total = total + 0.0 * h_NH.sum()
    return total, torch.cat(divs), torch.cat(ents), coef.info


class Trainer:
    """Runs optimiser steps over examples; resumable from (weights, optimiser, TrainState).

    ``teacher_model``: the teacher for live-teacher objectives (``train.live_teacher``); its
    examples must carry ``teacher_context_ids``.
    """

    def __init__(self, model, cfg: TrainConfig, pad_id: int, total_steps: int,
                 teacher_model: torch.nn.Module | None = None, teacher_batch_size: int = 32,
                 share_prefix: bool = True, dist=None):
        self.model = model
        if cfg.activation_checkpointing:
            # recompute each decoder layer in backward: activations of one layer instead of all
            # (transformers 5 renamed gradient_checkpointing_enable and deprecated the old name)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pack = cfg.share_prompts and supports_packing(model)
        # opsd.training.distributed.DataParallel: this rank trains on its share of every batch
        self.dist = dist
        self.cfg = cfg
        self.pad_id = pad_id
        self.total_steps = max(1, total_steps)
        self.forward: LossModule | None = None
        if dist is not None and dist.sharded:
            # before the optimiser is built: AdamW holds (and shards its moments like) the
            # sharded parameters
            self.forward = LossModule(model)
            dist.fully_shard(self.forward, model)
        self.opt, self.sched = make_optimizer(model, cfg, total_steps)
        self.state = TrainState()
        self.teacher = (LiveTeacher(teacher_model, teacher_batch_size, share_prefix)
                        if teacher_model is not None else None)

    def step(self, examples: list[Example], epoch: int = 0) -> StepStats:
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
            # the same number of micro-batches; with DDP at least one (same metric names on every
            # rank). A rank short of a ragged last batch runs a copy of the batch's first example
            # with loss weight 0: a zero gradient, its statistics dropped.
            want = int(self.dist.max(len(micro))) if self.forward is not None else 1
            micro += [examples[:1]] * max(0, want - len(micro))
        for m, part in enumerate(micro):
            mb = collate(part, self.pad_id, pack=self.pack)
            # Token-mean over the whole optimiser batch, however it is split.
            scale = 1.0 / max(1, n_tokens) if m < n_real else 0.0
            loss, div, ent, info = micro_batch_loss(self.model, mb, cfg, scale, teacher=self.teacher,
                                                    progress=progress, forward=self.forward)
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
            # Sum of every rank's (1/n_tokens-scaled) gradients = the one-process gradient
            # (under FSDP the backward has reduce-scattered them already).
            if not self.dist.sharded:
                self.dist.all_reduce_grads(self.model)
            loss = self.dist.sum([loss])[0]
            info_sum = dict(zip(sorted(info_sum), self.dist.sum([info_sum[k] for k in sorted(info_sum)])))
            d_sum, d_n, e_sum = self.dist.sum([div_stats[0], div_stats[1], div_stats[4]])
            div_stats = (d_sum, d_n, self.dist.min(div_stats[2]), self.dist.max(div_stats[3]), e_sum)
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
            extra={k: v / max(1, n_tokens) for k, v in info_sum.items()},
        )
        self.state.history.append(stats.as_dict())
        return stats


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
