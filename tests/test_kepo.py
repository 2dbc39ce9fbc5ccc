"""KEPO's hinted rescue (stages.rollout.rescue): a prompt none of whose replies passes gets the
first passing reply of the model reading the hint in place of its last reply."""

from __future__ import annotations

from opsd.backends.hf import Generation, SamplingParams
from opsd.data.rows import Row
from opsd.stages.rollout import rescue


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i): replies are readable strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


class Scripted:
    """The hinted sampler's replies, scripted per prompt (the selection logic under test; the
    real sampler runs in tests/test_online_recipes.py::...[kepo])."""

    def __init__(self, replies: dict[int, list[str]]):
        self.replies, self.calls = replies, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        out = []
        for p, prompt in enumerate(prompts):
            for s in range(params.n):
                text = self.replies[prompt[0]][s]
                out.append(Generation(p, s, [ord(c) - 97 for c in text], [-0.5] * len(text), "stop"))
        return out


def _row(i: int) -> Row:
    return Row.model_validate({"id": f"q{i}", "prompt": "?", "task": "t",
                               "verifier": {"type": "regex", "pattern": "^yes"}})


def _gens(texts: list[list[str]]) -> list[Generation]:
    return [Generation(p, s, [ord(c) - 97 for c in t], [-1.0] * len(t), "stop")
            for p, ts in enumerate(texts) for s, t in enumerate(ts)]


def test_only_prompts_without_a_passing_reply_are_rescued_by_their_first_passing_try():
    rows = [_row(0), _row(1), _row(2)]
    gens = _gens([["no", "yes"],     # q0 passes already: untouched, not even resampled
                  ["no", "nope"],    # q1: the 2nd hinted try passes -> replaces sample 1
                  ["no", "nah"]])    # q2: no hinted try passes -> kept as it was
    hinted = Scripted({11: ["nay", "yesss", "yes"], 12: ["no", "nil", "n"]})
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    out, rescued = rescue(rows, gens, [[10], [11], [12]], hinted, Letters(), params, tries=3)
    assert rescued == 1
    (prompts, used), = hinted.calls
    assert prompts == [[11], [12]] and used.n == 3 and used.seed != params.seed
    texts = [Letters().decode(g.response_ids) for g in out]
    assert texts == ["no", "yes", "no", "yesss", "no", "nah"]
    new = out[3]
    assert (new.prompt_index, new.sample_index) == (1, 1)
    assert new.logprobs == [-0.5] * 5 and new.guided == [0, 1, 2, 3, 4]  # the hinted sampler's
    assert out[2] is gens[2] and out[5] is gens[5]


def test_nothing_to_rescue_samples_nothing():
    hinted = Scripted({})
    out, rescued = rescue([_row(0)], _gens([["yes", "no"]]), [[10]], hinted, Letters(),
                          SamplingParams(n=2), tries=4)
    assert rescued == 0 and not hinted.calls and len(out) == 2


def test_student_behaviour_is_the_students_own_log_prob_of_the_rescued_reply(tiny_model_dir):
    """rollout.rescue_behaviour: student — the rescued reply's stored behaviour log-probs are
    log pS(y_t | plain prompt, y_<t) by one plain forward of the student (brute force here), so
    GRPO's ratio starts at 1 instead of pS/p_hint."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [_row(0), _row(1)]
    gens = _gens([["no", "nope"], ["no", "yes"]])  # q0 fails: rescued; q1 passes: untouched
    hinted = Scripted({10: ["nay", "yes"]})
    prompts = [[5, 6, 7], [8, 9]]
    out, rescued = rescue(rows, gens, [[10], [11]], hinted, Letters(),
                          SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3), tries=2,
                          student=(model, prompts))
    assert rescued == 1
    new = out[1]
    assert Letters().decode(new.response_ids) == "yes" and new.guided == [0, 1, 2]
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + new.response_ids])
        lp_TV = model(ids).logits[0].float().log_softmax(-1)
    want = [float(lp_TV[len(prompts[0]) - 1 + t, tok]) for t, tok in enumerate(new.response_ids)]
    assert new.logprobs != [-0.5] * 3  # not the hinted sampler's
    assert torch.allclose(torch.tensor(new.logprobs), torch.tensor(want), atol=1e-4)
    assert out[2] is gens[2] and out[3] is gens[3]


def test_student_behaviour_is_refused_where_it_would_not_match_the_other_samples():
    import pytest

    from opsd.config import ConfigError, config_from_dict

    base = {"name": "k", "mode": "online", "model": {"name": "m"}, "data": {"source": "behaviours"},
            "rollout": {"rescue_tries": 2, "rescue_behaviour": "student", "temperature": 0.7},
            "teacher": {"kind": "live"}}
    with pytest.raises(ConfigError, match="rescue_behaviour"):
        config_from_dict(base, "recipe")
    ok = config_from_dict({**base, "rollout": {**base["rollout"], "temperature": 1.0}}, "recipe")
    assert ok.rollout.rescue_behaviour == "student"
