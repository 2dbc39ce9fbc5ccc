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
