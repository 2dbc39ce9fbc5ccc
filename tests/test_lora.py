"""LoRA (train.lora): the adapted model starts as the base, only the adapters train, folding them
back gives the very model that trained, and the train stage writes a plain checkpoint."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from opsd.config import PipelineConfig, TrainConfig
from opsd.training.lora import LoRALinear, add_adapters, merge_adapters
from tests.helpers import train_on

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_start_at_the_base_train_alone_and_fold_back_exactly(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7, 31]])
    base_logits = _logits(model, ids)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    rank = 4
    wrapped = add_adapters(model, TrainConfig().lora.targets, rank=rank, alpha=8.0, seed=0)
    assert len(wrapped) == 2 * len(PROJECTIONS)  # every projection of both layers, no lm_head
    assert all(name.endswith(PROJECTIONS) for name in wrapped)
    torch.testing.assert_close(_logits(model, ids), base_logits)  # B = 0: the base exactly
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # r (in + out) numbers per layer
    expected = sum(rank * (m.base.in_features + m.base.out_features)
                   for m in model.modules() if isinstance(m, LoRALinear))
    assert sum(p.numel() for p in trainable.values()) == expected

    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, base_logits)
    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base_state.items())  # base weights untouched

    assert merge_adapters(model) == len(wrapped)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_state)  # the base architecture's names again
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-4)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, base_state[k])}
    assert moved == {f"{n}.weight" for n in wrapped}


def test_adapters_are_seeded_and_a_regex_that_finds_nothing_is_an_error(tiny_model_dir):
    def first_a(seed):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_adapters(model, "q_proj$", rank=2, alpha=2.0, seed=seed)
        return model.model.layers[0].self_attn.q_proj.lora_A.detach().clone()

    assert torch.equal(first_a(0), first_a(0)) and not torch.equal(first_a(0), first_a(1))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="finds none of the model's .* linear layers"):
        add_adapters(model, "no_such_proj", rank=2, alpha=2.0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_train_stage_writes_a_plain_checkpoint_with_the_adapters_folded_in(artifacts, checkpointing):
    """With activation checkpointing too: the frozen embeddings give the checkpointed layers
    inputs that need no gradient, and the adapters inside must still get theirs."""
    base_model = artifacts["pool"].master(artifacts["policy"])
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    name = f"lora-{checkpointing}"
    man, model = train_on(artifacts, name, objective="forward_kl_topk", lora={"rank": 4, "alpha": 8},
                          activation_checkpointing=checkpointing)
    assert man["lora_layers"] == 2 * len(PROJECTIONS)
    assert (man["activation_checkpointing"]["checkpointed"] > 0) == checkpointing
    assert 0 < man["trainable_params"] < man["params"] / 10
    after = model.state_dict()
    assert set(after) == set(before)
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved and all(k.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)) for k in moved)
    saved = AutoModelForCausalLM.from_pretrained(artifacts["base"] / f"train-{name}" / "model",
                                                 torch_dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    torch.testing.assert_close(_logits(saved, ids), _logits(model.float(), ids))


def test_lora_config_is_checked_before_anything_trains():
    assert "lora" not in TrainConfig().key_dict()  # off: older train keys stay what they were
    assert TrainConfig(lora={"rank": 8}).key_dict()["lora"]["rank"] == 8
    with pytest.raises(ValidationError, match="not a regular expression"):
        TrainConfig.model_validate({"lora": {"rank": 8, "targets": "proj("}})
    with pytest.raises(ValidationError, match="train.trainable cannot also"):
        TrainConfig.model_validate({"lora": {"rank": 8}, "trainable": "mlp"})
    with pytest.raises(ValidationError, match="not supported with sharding=fsdp"):
        TrainConfig.model_validate({"lora": {"rank": 8}, "world_size": 2, "sharding": "fsdp"})
    with pytest.raises(ValidationError, match="offline training for now"):
        PipelineConfig.model_validate({"mode": "online", "train": {"lora": {"rank": 8}}})
