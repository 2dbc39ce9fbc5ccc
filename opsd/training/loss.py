"""The distillation loss of one micro-batch: decoder once, LM head chunk by chunk.

Memory: the decoder runs once per micro-batch; the LM head and log-softmax run on the ``N``
response positions only, ``logit_chunk`` positions at a time under activation checkpointing, so
only one chunk's ``[C, V]`` float32 logits (and the temporaries of that chunk's loss) are alive in
forward *and* backward — memory does not grow with batch × length × vocabulary. A live teacher's
logits are computed the same way, chunk by chunk, from its stored hidden states.

Each token's loss combines the objective's divergence (:mod:`opsd.objectives.registry`) with the
reward terms, with coefficients from :mod:`opsd.objectives.plan` (weighting, selection, routing).
The optimiser loop around it is :mod:`opsd.training.trainer`.

Shape suffixes: ``B`` batch rows, ``L`` padded length, ``N`` response tokens of the micro-batch,
``C`` one chunk of them, ``H`` hidden size, ``V`` vocabulary, ``K`` top-k ids (docs/architecture.md).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from opsd.config import TrainConfig
from opsd.device import resolve_dtype
from opsd.objectives import divergences as D
from opsd.objectives import registry
from opsd.objectives.plan import TokenStats, needs_stats, token_coefficients
from opsd.packing import kernel_mask
from opsd.training.batches import Batch


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
    obj = registry.get(cfg.objective)
    sids = None
    if main and obj.student_support(cfg):
        sids = D.student_topk(z_CV, _student_topk_k(cfg, topk_ids_CK))  # same order as log-probs
    return StudentRows(z_CV, token_C, topk_ids_CK, sids, full=main and obj.full_rows, inplace=inplace)


def main_divergence(cfg: TrainConfig, rows: StudentRows, t_logp_CV, teacher_C, behaviour_C,
                    topk_logp_CK, tail_C, inplace: bool = False, reference_C=None):
    """``(loss_C, div_C)`` of ``cfg.objective`` on one chunk (the registry entry's divergence;
    ``reference_C``, G-OPD's reference log-probs, goes to the objectives with an advantage)."""
    obj = registry.get(cfg.objective)
    if obj.divergence is None:  # 'none': the plan gives no distillation coefficient
        raise ValueError(f"objective {cfg.objective!r} has no divergence")
    extra = {"reference_C": reference_C} if obj.advantage else {}
    return obj.divergence(cfg, rows, t_logp_CV, teacher_C, behaviour_C, topk_logp_CK, tail_C,
                          inplace=inplace, **extra)


def _chunk_loss(cfg: TrainConfig, lm_head, teacher_head):
    """Loss of one chunk of response positions: (sum of weighted token losses, div_C, entropy_C)."""
    T = cfg.temperature
    d = cfg.divergence

    def fn(h_CH, th_CH, token_C, teacher_C, behaviour_C, reference_C, topk_ids_CK, topk_logp_CK,
           tail_C, distill_C, fkl_C, rkl_C, pg_C):
        z_CV = _student_logits(lm_head, h_CH, T)
        rows = _student_rows(cfg, z_CV, token_C, topk_ids_CK, main=distill_C is not None)
        del z_CV  # owned by the rows (or freed once the full log-probs exist)
        # the teacher's block only now: never three [C, V] blocks (logits, log-probs, teacher)
        t_logp_CV = _teacher_logp(teacher_head, th_CH, T) if th_CH is not None else None
        total = rows.token_C.new_zeros(())
        if distill_C is not None:
            loss_C, div_C = main_divergence(cfg, rows, t_logp_CV, teacher_C, behaviour_C,
                                            topk_logp_CK, tail_C, inplace=True,
                                            reference_C=reference_C)
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
    sampled = registry.get(cfg.objective).sampled
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


def reviser_config(cfg: TrainConfig) -> TrainConfig:
    """The train settings of SD-Zero's reviser term: plain NLL at temperature 1 on the revisions'
    sampled tokens, with the step's memory and kernel settings. The main objective's weighting,
    selection, routing, reward and temperature settings do not apply: the reviser is fitted to
    its verified revisions by supervised learning, as in the paper's self-revision training."""
    return TrainConfig(objective="nll", logit_chunk=cfg.logit_chunk, autocast=cfg.autocast,
                       attention=cfg.attention, share_prompts=cfg.share_prompts,
                       batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size)


def reviser_nll(model, batch: Batch, cfg: TrainConfig, loss_scale: float) -> torch.Tensor:
    """SD-Zero's reviser term on one micro-batch of passing revisions (prompt = the reviser
    context ``c``, response = the revision ``ŷ``)::

        Σ_{ŷ ∈ batch} Σ_t −log πθ(ŷ_t | c, ŷ_<t)

    returned detached; its gradient times ``loss_scale`` (``train.reviser.weight / |R|``, ``|R|``
    the revision tokens of the optimiser step) is accumulated into the parameters' ``.grad``.
    The same chunked path as the main loss (decoder once, LM head ``logit_chunk`` positions at a
    time), with :func:`reviser_config`'s settings."""
    total, _, _, _ = micro_batch_loss(model, batch, reviser_config(cfg), loss_scale)
    return total


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
    device = next(model.parameters()).device
    use_bf16 = resolve_dtype(cfg.autocast, device) == "bfloat16"  # "auto": the device's fast dtype
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
        total = torch.zeros((), device=device)
        divs, ents = [], []

        def part(x, sl):
            return None if x is None else x[sl]

        for s in range(0, batch.n_tokens, cfg.logit_chunk):
            sl = slice(s, s + cfg.logit_chunk)
            args = (
                h_NH[sl], part(th_NH, sl), batch.token_N[sl], batch.teacher_logp_N[sl],
                batch.behaviour_logp_N[sl], part(batch.reference_logp_N, sl), batch.topk_ids_NK[sl],
                batch.topk_logp_NK[sl],
                batch.tail_N[sl], part(coef.distill_N, sl), part(coef.fkl_N, sl),
                part(coef.rkl_N, sl), part(coef.pg_N, sl),
            )
            # Recompute the chunk's logits in backward instead of keeping them.
            loss_sum, div_C, ent_C = checkpoint(fn, *args, use_reentrant=False)
            total = total + loss_sum
            divs.append(div_C)
            ents.append(ent_C)
    if keep_graph and not total.requires_grad:
        # every parameter takes part in the backward's collectives, an untied LM head included
        total = total + 0.0 * h_NH.sum() + 0.0 * lm_head.weight.sum()
    return total, torch.cat(divs), torch.cat(ents), coef.info
