"""Inference copies with oneDNN-prepacked linears compute exactly what plain bf16 copies do,
survive deepcopy, and follow the training master through in-place refreshes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opsd.backends import prepack
from opsd.backends.hf import HFGenerator, SamplingParams, cast_for_inference

pytestmark = pytest.mark.skipif(not prepack.supported(), reason="no oneDNN bf16 linears here")


def _master() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg)


class _Tok:
    pad_token_id, eos_token_id = 0, 1


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_packed_copy_matches_plain_copy_bit_for_bit():
    master = _master()
    plain = cast_for_inference(master, torch.bfloat16, prepack=False)
    packed = cast_for_inference(master, torch.bfloat16)
    n_linear = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert sum(isinstance(m, prepack.PackedLinear) for m in packed.modules()) == n_linear
    ids = torch.randint(2, 101, (3, 7))
    assert torch.equal(_logits(packed, ids), _logits(plain, ids))
    # the dense view of a packed weight is the weight
    assert torch.equal(packed.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)
    # sampling: same tokens and behaviour log-probs
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=4)
    a = HFGenerator(plain, _Tok()).generate([[5, 6, 7], [8, 9]], sp)
    b = HFGenerator(packed, _Tok()).generate([[5, 6, 7], [8, 9]], sp)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]


def test_deepcopy_and_refresh_follow_the_master():
    master = _master()
    packed = cast_for_inference(master, torch.bfloat16)
    twin = copy.deepcopy(packed)
    ids = torch.randint(2, 101, (2, 5))
    assert torch.equal(_logits(twin, ids), _logits(packed, ids))
    with torch.no_grad():  # a training step moved the master
        for p in master.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prepack.refresh_from(packed, master)
    fresh = cast_for_inference(master, torch.bfloat16, prepack=False)
    assert torch.equal(_logits(packed, ids), _logits(fresh, ids))
    assert not torch.equal(_logits(twin, ids), _logits(packed, ids))  # the copy is independent


def test_fp32_copies_stay_plain():
    master = _master()
    assert cast_for_inference(master, torch.float32) is master  # no copy, nothing packed
    assert not any(isinstance(m, prepack.PackedLinear) for m in master.modules())


def test_released_weights_fail_loudly_until_refreshed():
    master = _master()
    packed = cast_for_inference(master, torch.bfloat16)
    ids = torch.randint(2, 101, (1, 4))
    before = _logits(packed, ids)
    prepack.release_packed(packed)
    with pytest.raises(RuntimeError, match="released"):
        _logits(packed, ids)
    copy.deepcopy(packed)  # a released copy still copies
    prepack.refresh_from(packed, master)
    assert torch.equal(_logits(packed, ids), before)
