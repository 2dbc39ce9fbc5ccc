"""The model pool: one fp32 master per policy, cached inference copies, hand-over for training."""

from pathlib import Path

import torch

from opsd.pool import ModelPool, base_policy


def test_take_master_hands_over_without_a_second_fp32_copy(tiny_model_dir):
    pool = ModelPool()
    base = base_policy(Path(tiny_model_dir))
    bf16 = pool.inference(base, "bfloat16")
    fp32_view = pool.inference(base, "float32")  # shares the master (same dtype)
    master = pool.master(base)
    assert fp32_view is master

    taken = pool.take_master(base)
    assert taken is master and base.key not in pool.masters
    # copies stay valid and no longer alias what the trainer will modify
    assert pool.inference(base, "bfloat16") is bf16
    private = pool.inference(base, "float32")
    assert private is not taken
    with torch.no_grad():
        next(taken.parameters()).add_(1.0)
    assert not torch.equal(next(private.parameters()), next(taken.parameters()))
    # asking again reloads the base from disk, untouched by the training above
    reloaded = pool.master(base)
    assert reloaded is not taken
    assert torch.equal(next(reloaded.parameters()), next(private.parameters()))


def test_cast_for_inference_matches_a_cast_deep_copy_and_keeps_ties(tiny_model_dir):
    import copy

    from opsd.backends.hf import cast_for_inference
    from opsd.models import load_model

    master = load_model(Path(tiny_model_dir), torch.float32)
    before = {k: v.clone() for k, v in master.state_dict().items()}
    # the cast itself (prepacked linears, on top of it, are checked in test_prepack.py)
    fast = cast_for_inference(master, torch.bfloat16, prepack=False)
    slow = copy.deepcopy(master).to(torch.bfloat16).eval()
    for (k, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    for k, v in master.state_dict().items():  # the master is untouched, still fp32
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    if master.config.tie_word_embeddings:
        assert fast.get_output_embeddings().weight is fast.get_input_embeddings().weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, slow(ids).logits)
    assert not fast.training
