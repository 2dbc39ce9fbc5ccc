"""Hugging Face (torch) backend: batched sampling and teacher scoring.

Generation is a small explicit decode loop rather than ``model.generate``: it
returns the behaviour log-prob of every sampled token without keeping the
per-step ``[B, V]`` score tensors ``generate`` would hold for the whole reply,
and it seeds sampling per call so a shard regenerates identically on resume.

Scoring runs the teacher over ``context + response`` and keeps only what
training needs per response token: the sampled token's log-prob, the top-k ids
and log-probs, and the tail mass ``1 - sum(top-k probs)``. Full-vocabulary
log-probs never leave this module. Rows that share a long context prefix (the
same demonstrations for every question of a rule) encode that prefix once and
reuse its KV cache, and the samples of one question share one encoding of the
rest of their context (packed rows, :mod:`opsd.packing`).

Devices: everything runs where the model's weights are (the pool put them on the run's
device). Inputs are built on the host and moved once per forward; sampling draws its uniforms
from a host generator (the same stream on every device, so a seed means the same draws) and
a decode step moves one small ``[5, B]`` block back to the host, its only synchronisation.
The KV cache is allocated once per batch for prompt + reply (:mod:`opsd.backends.kvcache`)
and written in place on any device. Results (token ids, log-probs, targets) come back on the
host.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from opsd.context import consensus
from opsd.backends.kvcache import make_cache
from opsd.backends.prepack import pack_linears
from opsd.packing import allowed, kernel_mask, pack, supports_packing

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass
class Generation:
    prompt_index: int
    sample_index: int
    response_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each sampled token (after temperature/top-p)
    finish_reason: str  # "stop" (an end token was sampled) or "length"
    guided: list[int] = field(default_factory=list)  # positions the teacher chose (Guidance)


@dataclass
class TokenTargets:
    sampled_logprob_R: torch.Tensor  # [R] float32
    topk_ids_RK: torch.Tensor  # [R, k] int32
    topk_logprobs_RK: torch.Tensor  # [R, k] float32
    tail_mass_R: torch.Tensor  # [R] float32, 1 - sum(exp(topk))


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5 renamed past_key_values → cache; support both spellings.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _filter_top_p(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits_BV
    sorted_logits, sorted_idx = logits_BV.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass *before* it already reaches top_p (keeps at least one).
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


@dataclass
class Guidance:
    """Teacher-guided sampling: the teacher corrects tokens it strongly rejects.

    Decoding runs the teacher in lockstep with the student (each on its own
    prompt). When the student samples ``y_t`` with
    ``log πT(y_t) - log πS(y_t) < -threshold`` while the teacher is confident
    (``max πT >= min_teacher_prob``), ``y_t`` is replaced by the teacher's
    argmax — at most ``max_per_sample`` times per reply; everything else is the
    student's own sample. This fixes the exposure problem of offline on-policy
    distillation: a phrase the student never starts ("Sure thing!", a closing
    line) never appears in its rollouts, so no teacher target ever teaches its
    continuation. Related: SKD (Xu et al., 2024) replaces student tokens outside
    the teacher's top-k.

    With ``mode="mix"`` (MixSD, Liu et al. 2026, "Mixed Contextual Self-Distillation for
    Knowledge Injection") no token is corrected: every token is drawn from the mixture of the
    two conditionals of the same model,

        y_t ~ q_t = mix · πT(· | context, y_<t) + (1 − mix) · πS(· | y_<t),

    the "expert" that reads the fact and the "naive" prior, so the reply carries the fact in
    tokens the model itself finds likely; SFT (objective ``nll``) on such replies injects the
    knowledge with supervision close to the model's own distribution. Drawn as the paper's
    mixing of tokens: per row and step a Bernoulli(mix) picks the conditional, and one uniform
    (the same as plain sampling) draws from it — exactly ``q_t``, see :func:`mix_step`.
    """

    model: torch.nn.Module
    contexts: Sequence[Sequence[int]]  # teacher prompt ids, one per prompt
    threshold: float = 3.0
    min_teacher_prob: float = 0.5
    max_per_sample: int = 4
    mode: str = "replace"  # or "mix"
    mix: float = 0.5


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    # Keep at least one token of every prompt outside the prefix: its logits are the output.
    n = min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return max(k, 0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Decoder:
    """KV-cached incremental decoding of a left-padded batch, with row compaction."""

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.cache_kw = _cache_kwarg(model)
        self.cache = None
        self.device = model_device(model)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                min_shared: int = 32) -> torch.Tensor:
        """Encode the prompts; a prefix common to all of them is encoded once, and so is each
        prompt that repeats (the n samples of one question): its row of the cache, the mask
        and the logits are copied to the repeats.

        Layout per row: ``[shared prefix][pads][rest of the prompt]`` — the
        attention mask hides the pads and position ids skip them, so every row
        sees exactly its own prompt.
        """
        first: dict[tuple, int] = {}
        rows = [first.setdefault(tuple(p), len(first)) for p in prompts]
        if len(first) == len(prompts):
            return self._prefill(prompts, max_new_tokens, min_shared)
        logits_UV = self._prefill([list(p) for p in first], max_new_tokens, min_shared)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keep(idx)  # gathers with repeats: row b of the cache = its prompt's encoding
        return logits_UV[idx]

    def _prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 min_shared: int) -> torch.Tensor:
        B = len(prompts)
        shared = _common_prefix_len(prompts)
        shared = shared if shared >= min_shared and B > 1 else 0
        rests = [p[shared:] for p in prompts]
        L = max(len(r) for r in rests)
        self.cache = make_cache(shared + L + max_new_tokens)
        dev = self.device
        prefix_mask = torch.ones((B, shared), dtype=torch.long, device=dev)
        if shared:
            self.mask_BL = prefix_mask[:1]
            self._forward(torch.tensor([list(prompts[0][:shared])], device=dev),
                          torch.arange(shared, device=dev)[None])
            self.cache.batch_repeat_interleave(B)
        ids_BL = torch.full((B, L), self.pad_id, dtype=torch.long)
        rest_mask_BL = torch.zeros((B, L), dtype=torch.long)
        for b, r in enumerate(rests):  # left padding: every row's next token is at column L
            ids_BL[b, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            rest_mask_BL[b, L - len(r) :] = 1
        self.mask_BL = torch.cat([prefix_mask, rest_mask_BL.to(dev)], dim=1)
        pos_BL = (self.mask_BL.cumsum(-1) - 1).clamp_min(0)[:, shared:]
        self.next_pos_B = pos_BL[:, -1] + 1
        return self._forward(ids_BL.to(dev), pos_BL)

    def advance(self, next_B: torch.Tensor) -> torch.Tensor:
        self.mask_BL = torch.cat([self.mask_BL, torch.ones_like(next_B)[:, None]], dim=1)
        pos = self.next_pos_B[:, None]
        self.next_pos_B = self.next_pos_B + 1
        return self._forward(next_B[:, None], pos)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (gather) these rows: drops finished rows so later steps only compute live ones;
        repeated indices copy a row."""
        self.cache.batch_select_indices(rows)
        self.mask_BL = self.mask_BL[rows]
        self.next_pos_B = self.next_pos_B[rows]

    def _forward(self, ids, pos) -> torch.Tensor:
        o = self.model(input_ids=ids, attention_mask=self.mask_BL, position_ids=pos,
                       use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        self.cache = _out_cache(o)
        return o.logits[:, -1].float()


def _dist(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the sampling distribution (temperature, top-p) per row."""
    if params.temperature == 0:
        return logits_BV.log_softmax(-1)
    return _filter_top_p(logits_BV / params.temperature, params.top_p).log_softmax(-1)


def _uniforms(rows: int, gen: torch.Generator) -> torch.Tensor:
    # the uniforms come from the host generator on every device: one seed, one stream
    return torch.rand((rows, 1), generator=gen, dtype=torch.float32)


def _draw(logp_BV: torch.Tensor, u_B1: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row (``torch.multinomial`` draws an exponential
    per vocabulary entry — ~100 ms per step for 128 × 49k on a CPU, more than the model's own
    forward); the argmax when greedy."""
    if greedy:
        return logp_BV.argmax(-1)
    cdf_BV = logp_BV.exp().cumsum(-1)
    u_B1 = u_B1.to(device=cdf_BV.device, dtype=cdf_BV.dtype) * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, u_B1).squeeze(-1).clamp_max(logp_BV.shape[-1] - 1)


def _sample(logits_BV: torch.Tensor, params: SamplingParams, gen: torch.Generator):
    """(next token, log-probs of the sampling distribution) per row."""
    logp_BV = _dist(logits_BV, params)
    greedy = params.temperature == 0
    u_B1 = None if greedy else _uniforms(logp_BV.shape[0], gen)
    return _draw(logp_BV, u_B1, greedy), logp_BV


def mix_step(s_logp_BV: torch.Tensor, t_logp_BV: torch.Tensor, u_B1: torch.Tensor | None,
             pick_B: torch.Tensor) -> torch.Tensor:
    """One MixSD token per row: from the teacher's distribution where ``pick_B`` (a
    Bernoulli(mix) draw), else from the student's, both with the same uniform ``u_B1`` (None:
    greedy). The pick is independent of ``u``, so ``P(y) = mix · pT(y) + (1 − mix) · pS(y)``."""
    greedy = u_B1 is None
    return torch.where(pick_B, _draw(t_logp_BV, u_B1, greedy), _draw(s_logp_BV, u_B1, greedy))


class HFGenerator:
    """Samples replies from a causal LM, ``batch_size`` sequences at a time."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, pad_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        self.stop_ids = stop_token_ids(model, tokenizer)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        progress: ProgressFn | None = None,
        guidance: Guidance | None = None,
    ) -> list[Generation]:
        """n replies per prompt; results ordered by (prompt_index, sample_index)."""
        work = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        gen = torch.Generator().manual_seed(params.seed)
        # MixSD's conditional picks: a stream of their own, so the sampling uniforms stay those
        # of plain sampling with the same seed
        pick_gen = torch.Generator().manual_seed(params.seed + 1)
        out: list[Generation] = []
        for start in range(0, len(work), self.batch_size):
            chunk = work[start : start + self.batch_size]
            out.extend(self._generate_batch(prompts, chunk, params, gen, guidance, pick_gen))
            if progress:
                progress(len(chunk))
        return out

    def _generate_batch(self, prompts, index, params: SamplingParams, gen, guidance, pick_gen):
        B = len(index)
        student = _Decoder(self.model, self.pad_id)
        logits_BV = student.prefill([prompts[p] for p, _ in index], params.max_new_tokens)
        teacher = None
        dev = student.device
        if guidance is not None:
            teacher = _Decoder(guidance.model, self.pad_id)
            t_logits_BV = teacher.prefill([guidance.contexts[p] for p, _ in index], params.max_new_tokens)
            n_guided_B = torch.zeros(B, dtype=torch.long, device=dev)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=dev)
        live_B = torch.arange(B, device=dev)  # original row of each live row
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        guided: list[list[int]] = [[] for _ in range(B)]
        reason = ["length"] * B
        stop_set = set(self.stop_ids)
        finished = [False] * B  # per live row: already ended (kept until the next compaction)
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        mixing = guidance is not None and guidance.mode == "mix"
        for t in range(params.max_new_tokens):
            if mixing:
                logp_BV, t_logp_BV = _dist(logits_BV, params), _dist(t_logits_BV, params)
                greedy = params.temperature == 0
                u_B1 = None if greedy else _uniforms(logp_BV.shape[0], gen)
                pick_B = (torch.rand(logp_BV.shape[0], generator=pick_gen) < guidance.mix).to(dev)
                next_B = mix_step(logp_BV, t_logp_BV, u_B1, pick_B)
                fix_B = pick_B & ~done_B  # recorded as the teacher's tokens ("guided")
            else:
                next_B, logp_BV = _sample(logits_BV, params, gen)
                fix_B = torch.zeros_like(done_B)
            if teacher is not None and not mixing:
                t_logp_BV = t_logits_BV.log_softmax(-1)
                gap_B = t_logp_BV.gather(-1, next_B[:, None]).squeeze(-1) - logp_BV.gather(
                    -1, next_B[:, None]).squeeze(-1)
                t_best_B, t_arg_B = t_logp_BV.max(-1)
                fix_B = (gap_B < -guidance.threshold) & (t_best_B.exp() >= guidance.min_teacher_prob)
                fix_B &= (n_guided_B[live_B] < guidance.max_per_sample) & ~done_B
                # no host round trip to ask whether any row is fixed: rows not fixed keep theirs
                next_B = torch.where(fix_B, t_arg_B, next_B)
                n_guided_B.index_add_(0, live_B, fix_B.long())
            lp_B = logp_BV.gather(-1, next_B[:, None]).squeeze(-1)
            done_B = done_B | torch.isin(next_B, stop)
            # the step's one device -> host transfer (ids < 2**53 and float32 values are exact
            # in float64)
            host = torch.stack([live_B.double(), next_B.double(), lp_B.double(), fix_B.double(),
                                done_B.double()]).tolist()
            for r, tok, lp, fixed, was in zip(map(int, host[0]), map(int, host[1]), host[2],
                                              host[3], finished):
                if fixed:
                    guided[r].append(t)
                if not was:
                    toks[r].append(tok)
                    lps[r].append(lp)
                    if tok in stop_set:
                        reason[r] = "stop"  # the end token is kept: its probability is learned too
            n_done = int(sum(host[4]))
            if n_done == len(host[4]) or t == params.max_new_tokens - 1:
                break
            finished = [bool(d) for d in host[4]]
            # Compact only when a good share of rows finished: each compaction re-indexes
            # every layer's cache, which costs more than a few idle rows.
            if n_done * 8 >= len(finished):
                keep = (~done_B).nonzero().squeeze(-1)
                live_B, next_B, done_B = live_B[keep], next_B[keep], done_B[keep]
                student.keep(keep)
                if teacher is not None:
                    teacher.keep(keep)
                finished = [False] * len(keep)
            next_B = torch.where(done_B, torch.full_like(next_B, self.pad_id), next_B)
            logits_BV = student.advance(next_B)
            if teacher is not None:
                t_logits_BV = teacher.advance(next_B)
        return [
            Generation(p, s, toks[b], lps[b], reason[b], guided[b])
            for b, (p, s) in enumerate(index)
        ]


class HFScorer:
    """Teacher log-probs over given response ids, with shared-prefix KV reuse."""

    def __init__(self, model, *, batch_size: int = 32, share_prefix: bool = True,
                 min_shared_prefix: int = 32, logit_chunk: int | None = None,
                 pack: bool | None = None):
        self.model = model
        self.device = model_device(model)
        # rows of LM head + log-softmax per call: small on a CPU (the [C, V] block stays in
        # cache), large on an accelerator (fewer, fuller kernels); rows are independent, so the
        # targets do not depend on it
        if logit_chunk is None:
            logit_chunk = 64 if self.device.type == "cpu" else 512
        # the samples of a question also share their whole context (packed rows: needs a
        # kernel that takes a custom mask, eager or SDPA); by default with share_prefix
        self.pack = (share_prefix if pack is None else pack) and supports_packing(model)
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.min_shared_prefix = min_shared_prefix
        self.logit_chunk = logit_chunk
        self._cache_kw = _cache_kwarg(model)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.stats = {"tokens_computed": 0, "tokens_total": 0, "padding_tokens": 0}

    @torch.inference_mode()
    def score(
        self,
        contexts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        topk: int,
        progress: ProgressFn | None = None,
    ) -> list[TokenTargets]:
        """Targets for ``responses[i]`` following ``contexts[i]`` (order preserved)."""
        hidden = self._hidden(contexts, responses, progress)
        return [self._targets([h], torch.tensor(list(r), dtype=torch.long), topk, "none")
                for h, r in zip(hidden, responses)]

    @torch.inference_mode()
    def score_views(
        self,
        contexts_by_view: Sequence[Sequence[Sequence[int]]],
        responses: Sequence[Sequence[int]],
        topk: int,
        mode: str,
        progress: ProgressFn | None = None,
        tau: float = 1.0,
    ) -> list[TokenTargets]:
        """Consensus targets: the response scored under several contexts, the distributions
        combined by ``mode`` (:mod:`opsd.context.consensus`; ``tau``: gated_residual's gate)."""
        hidden = [self._hidden(ctxs, responses, progress) for ctxs in contexts_by_view]
        return [self._targets([hv[i] for hv in hidden], torch.tensor(list(r), dtype=torch.long),
                              topk, mode, tau) for i, r in enumerate(responses)]

    def _hidden(self, contexts, responses, progress) -> list[torch.Tensor]:
        """Final hidden states at the positions that predict each response token.

        Requests are grouped by context and sorted by length so each batch shares
        as long a prefix and wastes as little padding as possible.
        """
        order = sorted(range(len(contexts)),
                       key=lambda i: (tuple(contexts[i][:64]), len(contexts[i]) + len(responses[i])))
        results: list[torch.Tensor | None] = [None] * len(contexts)
        prefix_cache: dict[tuple, object] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            seqs = [list(contexts[i]) + list(responses[i]) for i in batch]
            n_resp = [len(responses[i]) for i in batch]
            shared = self._shared_prefix_len([contexts[i] for i in batch]) if self.share_prefix else 0
            for i, h in zip(batch, self._hidden_batch(seqs, n_resp, shared, prefix_cache)):
                results[i] = h
            if progress:
                progress(len(batch))
        return results  # type: ignore[return-value]

    def _shared_prefix_len(self, ctxs) -> int:
        first = ctxs[0]
        n = min(len(c) for c in ctxs)
        # Leave at least one context token outside the prefix: its logits score response token 0.
        n = min(n, len(first) - 1)
        k = 0
        while k < n and all(c[k] == first[k] for c in ctxs):
            k += 1
        return k if k >= self.min_shared_prefix else 0

    def _prefix(self, prefix: tuple, cache_store: dict):
        if prefix not in cache_store:
            if len(cache_store) > 8:  # bounded: batches are grouped by context
                cache_store.clear()
            ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
            o = self.decoder(input_ids=ids, use_cache=True)
            cache_store[prefix] = _out_cache(o)
            self.stats["tokens_computed"] += len(prefix)
        return cache_store[prefix]

    def _hidden_batch(self, seqs, n_resp, shared, cache_store) -> list[torch.Tensor]:
        B = len(seqs)
        suffixes = [s[shared:] for s in seqs]
        # samples of one question share their context: encode it once (packed rows, block mask)
        packed = pack([s[: len(s) - r] for s, r in zip(suffixes, n_resp)],
                      [s[len(s) - r :] for s, r in zip(suffixes, n_resp)], 0) if self.pack else None
        kwargs = {}
        if packed is not None:
            ids_BL = packed.ids_BL
            Bp, L = ids_BL.shape
            kwargs["attention_mask"] = kernel_mask(self.model, allowed(packed.segment_BL, packed.root_BL,
                                                                       shared))
            kwargs["position_ids"] = packed.position_ids_BL + shared
        else:
            L = max(len(s) for s in suffixes)
            Bp = B
            # Right padding: pads follow every real token, so causal attention needs no mask.
            ids_BL = torch.zeros((B, L), dtype=torch.long)
            for b, s in enumerate(suffixes):
                ids_BL[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            if shared:
                kwargs["position_ids"] = torch.arange(shared, shared + L)[None].expand(B, L)
        if shared:
            cache = copy.deepcopy(self._prefix(tuple(seqs[0][:shared]), cache_store))
            cache.batch_repeat_interleave(Bp)
            kwargs[self._cache_kw] = cache
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        hidden_BLH = self.decoder(input_ids=ids_BL.to(self.device), use_cache=bool(shared),
                                  **kwargs).last_hidden_state
        self.stats["tokens_computed"] += Bp * L
        real = sum(len(s) for s in suffixes) if packed is None else int((packed.segment_BL >= 0).sum())
        self.stats["padding_tokens"] += Bp * L - real
        self.stats["tokens_total"] += sum(len(s) for s in seqs)
        out = []
        for b in range(B):
            r = n_resp[b]
            if packed is not None:
                row, cols = packed.predicting(b, r)
                out.append(hidden_BLH[row, torch.from_numpy(cols).to(self.device)].clone())
                continue
            end = len(suffixes[b])  # position of the last real token + 1 (in suffix coords)
            # the output at position t predicts token t+1: response tokens are the last r tokens.
            out.append(hidden_BLH[b, end - r - 1 : end - 1].clone())
        return out

    def _targets(self, hs: list[torch.Tensor], y_R: torch.Tensor, topk: int, mode: str,
                 tau: float = 1.0) -> TokenTargets:
        """Per response token: sampled log-prob, top-k ids/log-probs, tail mass (on the host)."""
        y_R = y_R.to(self.device)
        parts = []
        for s in range(0, y_R.shape[0], self.logit_chunk):
            sl = slice(s, s + self.logit_chunk)
            views_VCV = torch.stack([self.lm_head(h[sl]).float().log_softmax(-1) for h in hs])
            logp_CV = consensus.combine(views_VCV, mode, tau)
            sampled_C = logp_CV.gather(-1, y_R[sl, None]).squeeze(-1)
            vals_CK, ids_CK = logp_CV.topk(topk, dim=-1)
            tail_C = (1.0 - vals_CK.exp().sum(-1)).clamp_min(0.0)
            parts.append((sampled_C, ids_CK.to(torch.int32), vals_CK, tail_C))
        if not parts:
            z = torch.zeros(0)
            return TokenTargets(z, torch.zeros((0, topk), dtype=torch.int32), torch.zeros((0, topk)), z)
        return TokenTargets(*(torch.cat(x).cpu() for x in zip(*parts)))


def sequence_logprobs(model, contexts, responses, *, batch_size: int = 16) -> list[torch.Tensor]:
    """Log-prob of each response token given its context (no top-k): retention, checks."""
    scorer = HFScorer(model, batch_size=batch_size, share_prefix=False)
    return [t.sampled_logprob_R for t in scorer.score(contexts, responses, topk=1)]


def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype, prepack: bool = True) -> torch.nn.Module:
    """An inference copy in ``dtype`` (the fp32 master stays untouched for training).

    ``prepack``: a bf16 CPU copy holds its linear weights in oneDNN's blocked layout
    (:mod:`opsd.backends.prepack`: identical outputs, ~20 % faster decoding here).

    Built tensor by tensor in the target dtype (``deepcopy`` with the cast tensors pre-seeded
    in its memo), not as a full-precision deep copy cast afterwards: that intermediate was a
    transient second fp32 model (+540 MB for SmolLM2-135M) at the process's memory peak.
    Tied weights stay tied (one memo entry per tensor)."""
    if next(model.parameters()).dtype == dtype:
        return model
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo or not t.is_floating_point():
            continue
        cast = t.detach().to(dtype)
        # requires_grad as in the source: bf16 decoding with requires_grad=False weights ran
        # 2.4x slower on this CPU (9.0 s vs 3.7 s for 64 replies), inference_mode or not
        memo[id(t)] = torch.nn.Parameter(cast, requires_grad=t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else cast
    clone = copy.deepcopy(model, memo)
    clone.eval()
    if prepack:
        pack_linears(clone)
    return clone


__all__ = [
    "SamplingParams",
    "Generation",
    "TokenTargets",
    "HFGenerator",
    "Guidance",
    "HFScorer",
    "sequence_logprobs",
    "cast_for_inference",
    "stop_token_ids",
    "model_device",
]
