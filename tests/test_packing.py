"""The packed micro-batch layout (samples of one question share their prompt) computes what the
plain layout computes: same hidden states at every response position, same loss, same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opsd.config import TrainConfig
from opsd.training.batches import Example, collate
from opsd.training.loss import decoder_inputs, micro_batch_loss
from opsd.training.trainer import Trainer

V, K = 97, 5


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    m.config._attn_implementation = attn
    return m


def _example(sid: str, prompt: list[int], r: int, seed: int) -> Example:
    g = np.random.default_rng(seed)
    resp = g.integers(1, V, r).tolist()
    topk = np.stack([g.choice(np.arange(1, V), K, replace=False) for _ in range(r)]).astype(np.int32) \
        if r else np.zeros((0, K), np.int32)
    logp = np.log(np.full((r, K), 0.15, np.float32))
    return Example(sid, list(prompt), resp, behaviour_logp=g.normal(-2, 0.5, r).astype(np.float32),
                   teacher_logp=g.normal(-2, 0.5, r).astype(np.float32), topk_ids=topk,
                   topk_logp=logp, tail=np.full(r, 0.25, np.float32), group=str(prompt[:2]))


def _examples() -> list[Example]:
    pa, pb, pc = [5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27]
    # interleaved questions, ragged replies (one empty), a question with a single sample
    spec = [("a0", pa, 6), ("b0", pb, 3), ("a1", pa, 9), ("a2", pa, 1), ("b1", pb, 7),
            ("c0", pc, 4), ("a3", pa, 0), ("b2", pb, 5)]
    return [_example(s, p, r, i) for i, (s, p, r) in enumerate(spec)]


def test_packed_layout_is_smaller_and_addresses_every_token():
    ex = _examples()
    plain, packed = collate(ex, 0), collate(ex, 0, pack=True)
    assert plain.segment_BL is None and packed.segment_BL is not None
    assert packed.input_ids_BL.numel() < plain.input_ids_BL.numel()
    # every response token sits where the plain layout has it, in the same order
    for b in (plain, packed):
        assert torch.equal(b.token_N, plain.token_N)
        assert torch.equal(b.seq_N, torch.repeat_interleave(torch.arange(len(ex)),
                                                            torch.tensor([len(e.response_ids) for e in ex])))
    # the token after each addressed position is the response token it predicts (except a
    # reply's first token, predicted by its prompt's last position)
    nxt = packed.input_ids_BL[packed.row_idx_N, packed.pos_idx_N + 1]
    first = packed.tokpos_N == 0
    assert torch.equal(nxt[~first], packed.token_N[~first])
    # position ids continue from each prompt's end
    assert torch.equal(packed.position_ids_BL[packed.row_idx_N[~first], packed.pos_idx_N[~first]] + 1,
                       plain.pos_idx_N[~first] + 1)


def test_no_shared_prompt_keeps_the_plain_layout():
    ex = [_example(f"s{i}", [3 + i, 4, 5], 4, i) for i in range(4)]
    assert collate(ex, 0, pack=True).segment_BL is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_hidden_states_equal_plain(attn):
    model = _model(attn).eval()
    ex = _examples()
    plain, packed = collate(ex, 0), collate(ex, 0, pack=True)
    dec = model.get_decoder()
    with torch.no_grad():
        h_plain = dec(**decoder_inputs(model, plain)).last_hidden_state[plain.row_idx_N, plain.pos_idx_N]
        h_packed = dec(**decoder_inputs(model, packed)).last_hidden_state[packed.row_idx_N, packed.pos_idx_N]
    torch.testing.assert_close(h_packed, h_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective,position", [("forward_kl_topk", "none"),
                                                ("reverse_kl_sampled", "iw_opd"),
                                                ("forward_kl_topk", "sigmoid")])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_plain(attn, objective, position):
    """Per-sequence normalised position weights read each token's example (``seq_N``), not its
    row: with several replies in one packed row the weights must not mix."""
    cfg = TrainConfig.model_validate({"objective": objective, "autocast": "none", "attention": attn,
                                      "weighting": {"position": position, "normalize": True,
                                                    "position_tau": 0.3}})
    ex = _examples()
    out = {}
    for pack in (False, True):
        model = _model(attn)
        loss, div, ent, _ = micro_batch_loss(model, collate(ex, 0, pack=pack), cfg, 1.0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[pack] = (loss, div, ent, grads)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][2], out[False][2], atol=1e-5, rtol=1e-5)
    for name, g in out[False][3].items():
        torch.testing.assert_close(out[True][3][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_trainer_packs_only_when_enabled_and_supported():
    ex = _examples()
    assert Trainer(_model("sdpa"), TrainConfig(), 0, 1).pack
    assert not Trainer(_model("sdpa"), TrainConfig(share_prompts=False), 0, 1).pack
    m = _model("sdpa")
    m.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert not Trainer(m, TrainConfig(), 0, 1).pack
    # checkpointed layers see the same mask in their recompute: same step as without
    steps = []
    for ckpt in (False, True):
        tr = Trainer(_model("eager"), TrainConfig(autocast="none", activation_checkpointing=ckpt,
                                                  attention="eager", batch_size=8,
                                                  micro_batch_size=8), 0, 1)
        steps.append(tr.step(ex))
    assert steps[0].loss == pytest.approx(steps[1].loss, rel=1e-6)
    assert steps[0].grad_norm == pytest.approx(steps[1].grad_norm, rel=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prefix_len", [0, 40])
def test_teacher_scoring_packed_equals_plain(attn, prefix_len):
    """The teacher scores the samples of one question under one encoding of its context (after
    the shared privileged prefix, itself encoded once and reused through the KV cache)."""
    from opsd.backends.hf import HFScorer

    model = _model(attn).eval()
    g = np.random.default_rng(1)
    prefix = g.integers(1, V, prefix_len).tolist()
    questions = [prefix + g.integers(1, V, n).tolist() for n in (6, 3, 9)]
    contexts, responses = [], []
    for q, n in zip(questions, (4, 1, 3)):
        for _ in range(n):
            contexts.append(q)
            responses.append(g.integers(1, V, int(g.integers(0, 12))).tolist())
    out = {}
    for pack in (False, True):
        scorer = HFScorer(model, batch_size=16, pack=pack)
        out[pack] = (scorer.score(contexts, responses, topk=K), scorer.stats)
    assert out[True][1]["tokens_computed"] < out[False][1]["tokens_computed"]
    for a, b in zip(out[True][0], out[False][0]):
        torch.testing.assert_close(a.sampled_logprob_R, b.sampled_logprob_R, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.topk_logprobs_RK, b.topk_logprobs_RK, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.tail_mass_R, b.tail_mass_R, atol=1e-5, rtol=1e-5)


def test_grouped_batch_order_keeps_each_questions_samples_together():
    from opsd.training.trainer import plan_batches

    groups = [f"q{i // 4}" for i in range(24)]  # 6 questions x 4 samples
    cfg = TrainConfig(batch_size=8, epochs=2, batch_order="grouped")
    plan = plan_batches(24, cfg, groups)
    assert [e for e, _ in plan] == [0, 0, 0, 1, 1, 1]
    for epoch in (0, 1):
        seen = [i for e, idx in plan if e == epoch for i in idx]
        assert sorted(seen) == list(range(24))  # every example once per epoch
    for _, idx in plan:
        assert len({groups[i] for i in idx}) == 2  # two whole questions per batch of 8
    assert plan == plan_batches(24, cfg, groups)  # seeded
    assert [idx for _, idx in plan[:3]] != [idx for _, idx in plan[3:]]  # reshuffled per epoch
    shuffled = plan_batches(24, TrainConfig(batch_size=8, epochs=2), groups)
    assert any(len({groups[i] for i in idx}) > 2 for _, idx in shuffled)
