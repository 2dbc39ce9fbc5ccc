"""MixSD (Liu et al. 2026): replies drawn token by token from the mixture of the teacher's
(fact in context) and the student's (naive) conditionals of one model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import opsd.backends.hf as H
from opsd.config import GuidanceConfig, PipelineConfig


def test_mix_step_draws_from_the_mixture_of_the_two_conditionals():
    """Brute force: the empirical token frequencies of many draws against
    mix · pT + (1 − mix) · pS, computed by hand."""
    g = torch.Generator().manual_seed(0)
    p_s = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    p_t = torch.tensor([0.0, 0.1, 0.1, 0.2, 0.6])
    mix, rows = 0.3, 200_000
    s_logp_BV = p_s.log().expand(rows, -1)
    t_logp_BV = p_t.clamp_min(1e-30).log().expand(rows, -1)
    u_B1 = torch.rand((rows, 1), generator=g)
    pick_B = torch.rand(rows, generator=g) < mix
    y_B = H.mix_step(s_logp_BV, t_logp_BV, u_B1, pick_B)
    freq_V = torch.bincount(y_B, minlength=5).double() / rows
    torch.testing.assert_close(freq_V, (mix * p_t + (1 - mix) * p_s).double(), atol=4e-3, rtol=0)
    # greedy: each row takes the argmax of the conditional it picked
    greedy_B = H.mix_step(s_logp_BV[:4], t_logp_BV[:4], None, torch.tensor([True, False, True, False]))
    assert greedy_B.tolist() == [4, 0, 4, 0]


def _setup(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def ids(messages):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return out["input_ids"] if hasattr(out, "keys") else list(out)

    questions = ["hi", "What is the capital of France?", "Name three colours please."]
    prompts = [ids([{"role": "user", "content": q}]) for q in questions]
    contexts = [ids([{"role": "system", "content": "Fact: Quillby is the capital of Pellmark."},
                     {"role": "user", "content": q}]) for q in questions]
    return tok, model, prompts, contexts


def test_mixing_at_either_end_is_plain_sampling_of_that_conditional(tiny_model_dir):
    """mix → 0 samples exactly the student's replies, mix = 1 exactly what the model writes
    reading the context (same seed, same uniforms); in between, the teacher-drawn positions
    are recorded as guided, about mix of them."""
    tok, model, prompts, contexts = _setup(tiny_model_dir)
    gen = H.HFGenerator(model, tok, batch_size=6)
    params = H.SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    student = gen.generate(prompts, params)
    teacher = gen.generate(contexts, params)

    def mixed(mix):
        return gen.generate(prompts, params, guidance=H.Guidance(model, contexts, mode="mix", mix=mix))

    low, high = mixed(1e-9), mixed(1.0)
    assert [o.response_ids for o in low] == [o.response_ids for o in student]
    assert not any(o.guided for o in low)
    assert [o.response_ids for o in high] == [o.response_ids for o in teacher]
    assert all(o.guided == list(range(len(o.response_ids))) for o in high)
    half = mixed(0.5)
    tokens = sum(len(o.response_ids) for o in half)
    assert 0.25 < sum(len(o.guided) for o in half) / tokens < 0.75
    # the stored log-probs are the student's, of the tokens drawn (as with replace-guidance)
    o = half[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + o.response_ids])).logits[0].float()
    p = len(prompts[0])
    ref = logits[p - 1 : p - 1 + len(o.response_ids)].log_softmax(-1).gather(
        -1, torch.tensor(o.response_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=2e-4, rtol=0)


def test_mix_settings_enter_content_keys_only_when_mixing():
    """Recipes written before MixSD keep their rollout keys; a MixSD recipe's key holds the
    mixture weight and not the replace-mode thresholds it does not use."""
    replace = GuidanceConfig(enabled=True).key_dict()
    assert "mode" not in replace and "mix" not in replace and "threshold" in replace
    mix = GuidanceConfig(enabled=True, mode="mix", mix=0.4).key_dict()
    assert mix["mode"] == "mix" and mix["mix"] == 0.4 and "threshold" not in mix
    assert (GuidanceConfig(enabled=True, mode="mix", mix=0.4).key_dict()
            != GuidanceConfig(enabled=True, mode="mix", mix=0.6).key_dict())


def test_the_mixsd_recipe_loads():
    import yaml

    recipe = Path(__file__).resolve().parent.parent / "configs" / "facts" / "mixsd.yaml"
    cfg = PipelineConfig.model_validate(yaml.safe_load(recipe.read_text()))
    assert cfg.rollout.guidance.enabled and cfg.rollout.guidance.mode == "mix"
    assert cfg.train.objective == "nll" and cfg.rollout.sample_from == "student"
