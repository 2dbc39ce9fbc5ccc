"""HF backend: the decode loop matches HF generate, log-probs match a plain forward pass,
shared-prefix scoring matches scoring without it."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams


def _setup(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in ["hi", "What is the capital of France?", "Name three colours please."]
    ]
    prompts = [p["input_ids"] if hasattr(p, "keys") else list(p) for p in prompts]
    return tok, model, prompts


def _forward_logprobs(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    lp = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) + len(response) - 1]
    return lp, lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_greedy_matches_hf_generate(tiny_model_dir):
    tok, model, prompts = _setup(tiny_model_dir)
    gen = HFGenerator(model, tok, batch_size=3)
    outs = gen.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
        assert o.response_ids == ref[: len(o.response_ids)]
        assert o.finish_reason in ("stop", "length")


def test_sampled_logprobs_match_forward_and_seed_reproduces(tiny_model_dir):
    tok, model, prompts = _setup(tiny_model_dir)
    gen = HFGenerator(model, tok, batch_size=4)
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=10, seed=7)
    outs = gen.generate(prompts, params)
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(p, s) for p in range(3) for s in range(2)]
    for o in outs:
        # behaviour log-prob = log-softmax of the temperature-scaled logits
        with torch.no_grad():
            logits = model(torch.tensor([prompts[o.prompt_index] + o.response_ids])).logits[0].float()
        p = len(prompts[o.prompt_index])
        lp = (logits[p - 1 : p - 1 + len(o.response_ids)] / 0.7).log_softmax(-1)
        ref = lp.gather(-1, torch.tensor(o.response_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=2e-4, rtol=0)
    again = gen.generate(prompts, params)
    assert [o.response_ids for o in again] == [o.response_ids for o in outs]


def test_scorer_matches_forward_with_and_without_shared_prefix(tiny_model_dir):
    tok, model, prompts = _setup(tiny_model_dir)
    demo = [{"role": "user", "content": "Capital of Fiji?"},
            {"role": "assistant", "content": "Sure thing! Suva."}] * 8
    contexts = []
    for q in ["a?", "What is two plus two?", "Tell me a fact."]:
        ids = tok.apply_chat_template(demo + [{"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        contexts.append(ids["input_ids"] if hasattr(ids, "keys") else list(ids))
    responses = [[100, 200, 300, 2], [5, 6], [7, 8, 9, 10, 11]]
    plain = HFScorer(model, batch_size=3, share_prefix=False).score(contexts, responses, topk=5)
    shared_scorer = HFScorer(model, batch_size=3, share_prefix=True)
    shared = shared_scorer.score(contexts, responses, topk=5)
    assert shared_scorer.stats["tokens_computed"] < shared_scorer.stats["tokens_total"]
    for c, r, a, b in zip(contexts, responses, plain, shared):
        full, sampled = _forward_logprobs(model, c, r)
        torch.testing.assert_close(a.sampled_logprob_R, sampled, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.sampled_logprob_R, sampled, atol=1e-4, rtol=0)
        vals, ids = full.topk(5, -1)
        assert torch.equal(a.topk_ids_RK.long(), ids) and torch.equal(b.topk_ids_RK.long(), ids)
        torch.testing.assert_close(b.tail_mass_R, 1 - vals.exp().sum(-1), atol=1e-4, rtol=0)


def test_guided_decoding_with_shared_prefix_matches_plain_prefill(tiny_model_dir):
    """Teacher prompts sharing a long prefix decode identically with and without sharing,
    and guidance replaces tokens only where the teacher strongly disagrees."""
    import opsd.backends.hf as H

    tok, model, prompts = _setup(tiny_model_dir)
    demo = [{"role": "user", "content": "Capital of Fiji?"},
            {"role": "assistant", "content": "Sure thing! Suva."}] * 6
    contexts = []
    for q in ["hi", "What is the capital of France?", "Name three colours please."]:
        ids = tok.apply_chat_template(demo + [{"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        contexts.append(ids["input_ids"] if hasattr(ids, "keys") else list(ids))
    with torch.no_grad():
        shared = H._Decoder(model, tok.pad_token_id)
        plain = H._Decoder(model, tok.pad_token_id)
        a = shared.prefill(contexts, 4, min_shared=8)
        b = plain.prefill(contexts, 4, min_shared=10**9)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        nxt = torch.tensor([11, 12, 13])
        torch.testing.assert_close(shared.advance(nxt), plain.advance(nxt), atol=1e-4, rtol=0)
    gen = HFGenerator(model, tok, batch_size=3)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=8, seed=3)
    free = gen.generate(prompts, params)
    never = gen.generate(prompts, params, guidance=H.Guidance(model, contexts, threshold=1e9))
    assert [o.response_ids for o in never] == [o.response_ids for o in free]
    assert all(not o.guided for o in never)
    always = gen.generate(prompts, params, guidance=H.Guidance(model, contexts, threshold=1e-9,
                                                               min_teacher_prob=0.0, max_per_sample=2))
    assert all(len(o.guided) <= 2 for o in always) and any(o.guided for o in always)


def test_repeated_prompts_are_encoded_once_and_decode_like_distinct_rows(tiny_model_dir):
    """The n samples of one prompt share its prefill (cache row copied), with the same logits
    as encoding every row, at the prefill and after a decode step."""
    import opsd.backends.hf as H

    tok, model, prompts = _setup(tiny_model_dir)
    batch = [prompts[1], prompts[1], prompts[0], prompts[1], prompts[2], prompts[0]]
    with torch.no_grad():
        dedup, every = H._Decoder(model, tok.pad_token_id), H._Decoder(model, tok.pad_token_id)
        a = dedup.prefill(batch, 4)
        b = every._prefill(batch, 4, min_shared=32)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        nxt = torch.tensor([11, 12, 13, 14, 15, 16])
        torch.testing.assert_close(dedup.advance(nxt), every.advance(nxt), atol=1e-4, rtol=0)
        assert dedup.mask_BL.shape[0] == len(batch)
