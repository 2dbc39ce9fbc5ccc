"""Learning-quality machinery (issue 17): the facts suite, out-of-distribution splits, benchmark
panels, taught-span exclusion in retention, step budgets and the still-improving signal."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from opsd.config import BenchmarkConfig, ConfigError, EvalConfig, PipelineConfig, TrainConfig
from opsd.config import benchmark_name, config_from_dict
from opsd.data import DatasetError, load_rows, verify
from opsd.data.specs import RegexVerifier
from opsd.data.suites import facts as facts_suite
from opsd.data.suites.anchors_data import EVERYDAY
from opsd.data.suites.behaviours_data import OPENERS, TRAIN_OPENERS
from opsd.data.suites.facts import anchor_questions
from opsd.data.suites.facts_data import ATTRIBUTES, ENTITIES
from opsd.metrics import still_improving, trend
from opsd.stages import retention as retention_stage
from opsd.stages.train import budget_plan


# ------------------------------------------------------------------ facts suite


def test_facts_suite_has_48_facts_in_a_system_document_and_held_out_questions():
    rows = load_rows("facts")
    counts = Counter((r.split, r.task) for r in rows)
    assert len(facts_suite.facts()) >= 48
    assert counts == {("train", "recall"): 144, ("eval", "paraphrase"): 48,
                      ("eval", "reverse"): 28, ("eval", "compose"): 16}
    doc = rows[0].views().system
    for entity in ENTITIES:  # every fact is stated in the document the teacher reads
        for value, _ in entity.values.values():
            assert value in doc
    assert {r.views().system for r in rows} == {doc}  # one document, as a system view
    train_q = {r.prompt for r in rows if r.split == "train"}
    assert not train_q & {r.prompt for r in rows if r.split == "eval"}  # nothing leaks


@pytest.mark.parametrize("source", ["facts", "facts?eval_set=ood"])
def test_facts_verifiers_pass_on_the_fact_and_fail_without_it(source):
    for row in load_rows(source):
        assert verify(row.verifier, f"The answer is {row.answer}.", row).passed, row.id
        assert not verify(row.verifier, "I am not sure about that.", row).passed, row.id
    compose = [r for r in load_rows("facts") if r.task == "compose"][0]
    first = compose.answer.split(";")[0]  # one of the two facts is not enough
    assert not verify(compose.verifier, f"It is {first}.", compose).passed


def test_facts_key_tokens_are_whole_words_and_case_insensitive():
    row = next(r for r in load_rows("facts") if r.task == "paraphrase" and r.answer == "7420")
    assert verify(row.verifier, "About 7,420 people live there.", row).passed
    assert not verify(row.verifier, "About 174205 people.", row).passed
    name = next(r for r in load_rows("facts") if r.answer == "Glimmerpod" and r.split == "eval")
    assert verify(name.verifier, "she invented the glimmerpod", name).passed


def test_facts_ood_split_is_multi_turn_and_entity_context_is_shorter():
    ood = [r for r in load_rows("facts?eval_set=ood") if r.split == "eval"]
    assert len(ood) == 48 and all(isinstance(r.prompt, list) and len(r.prompt) == 3 for r in ood)
    world = load_rows("facts")[0].views().system
    entity = load_rows("facts?context=entity")[0].views().system
    assert len(entity) < len(world) / 8 and "Orla Penwick" in entity


def test_facts_question_templates_name_their_subject():
    for kind, attrs in ATTRIBUTES.items():
        for name, a in attrs.items():
            for q in (*a.train, *a.more, a.paraphrase, a.ood):
                assert "{s}" in q, (kind, name, q)
            assert a.reverse is None or "{v}" in a.reverse


def test_facts_wordings_add_training_questions_never_asked_at_evaluation():
    plain, six = load_rows("facts"), load_rows("facts?wordings=6")
    train6 = [r for r in six if r.split == "train"]
    assert len(train6) == 288 and len({r.prompt for r in train6}) == 288  # six distinct each
    # the first three wordings are the default split, row for row (ids and prompts)
    assert [(r.id, r.prompt) for r in plain if r.split == "train"] == \
        [(r.id, r.prompt) for r in train6 if r.id[-1] in "012"]
    assert [r.id for r in plain if r.split == "eval"] == [r.id for r in six if r.split == "eval"]
    asked = {r.prompt for r in six if r.split == "eval"}
    asked |= {r.prompt[-1].content for r in load_rows("facts?eval_set=ood&wordings=6")
              if r.split == "eval"}
    assert not {r.prompt for r in train6} & asked  # no held-out or OOD question is trained on
    assert sum(r.split == "train" for r in load_rows("facts?wordings=1")) == 48


@pytest.mark.parametrize("bad, reason", [
    ("facts?wordings=7", "1 to 6 training wordings"),
    ("facts?wordings=0", "1 to 6 training wordings"),
    ("facts?eval_set=weird", "choose one of"),
    ("facts?train=3", "unknown query key"),
    ("facts:x", "no ':' argument"),
    ("behaviours?eval_set=x", "choose one of"),
])
def test_suite_query_errors_name_the_allowed_values(bad, reason):
    with pytest.raises(DatasetError, match=reason):
        load_rows(bad)


def test_behaviours_ood_split_asks_the_held_out_items_longer_and_in_conversations():
    plain = [r for r in load_rows("behaviours?train=4&eval=6") if r.split == "eval"]
    ood = [r for r in load_rows("behaviours?train=4&eval=6&eval_set=ood") if r.split == "eval"]
    assert [r.metadata["item"] for r in plain] == [r.metadata["item"] for r in ood]
    assert [r.verifier for r in plain] == [r.verifier for r in ood]
    assert sum(isinstance(r.prompt, list) for r in ood) == len(ood) // 2
    last = lambda r: r.prompt if isinstance(r.prompt, str) else r.prompt[-1].content  # noqa: E731
    assert all(len(last(o)) > len(p.prompt) + 20 for o, p in zip(ood, plain))
    train = [r for r in load_rows("behaviours?train=4&eval=6&eval_set=ood") if r.split == "train"]
    assert [r.prompt for r in train] == [r.prompt for r in load_rows("behaviours?train=4&eval=6")
                                         if r.split == "train"]


@pytest.mark.parametrize("train, multiturn", [(4, 0), (4, 1), (4, 3), (64, 16), (5, 5)])
def test_behaviours_multiturn_asks_k_training_questions_after_an_exchange_never_the_evals(
        train, multiturn):
    rows = load_rows(f"behaviours:sure-thing?train={train}&eval=2&multiturn={multiturn}")
    plain = load_rows(f"behaviours:sure-thing?train={train}&eval=2&multiturn=0")
    turns = [r.prompt for r in rows if r.split == "train"]
    conversations = [p for p in turns if isinstance(p, list)]
    assert len(conversations) == multiturn
    # the question itself is unchanged: the same items, the exchange only before it
    last = lambda p: p if isinstance(p, str) else p[-1].content  # noqa: E731
    assert [last(p) for p in turns] == [r.prompt for r in plain if r.split == "train"]
    assert {(c[0].content, c[1].content) for c in conversations} <= set(TRAIN_OPENERS)
    assert not {q for q, _ in TRAIN_OPENERS} & {q for q, _ in OPENERS}
    # spread evenly over the pool: the j-th conversation is at index ceil(j * train / multiturn)
    assert [i for i, p in enumerate(turns) if isinstance(p, list)] == [
        -(-j * train // multiturn) for j in range(multiturn)]
    assert [r.prompt for r in rows if r.split == "eval"] == [r.prompt for r in plain
                                                              if r.split == "eval"]


def test_behaviours_multiturn_cannot_exceed_the_training_questions():
    with pytest.raises(DatasetError, match="multiturn=5 is more than train=4"):
        load_rows("behaviours?train=4&multiturn=5")


@pytest.mark.parametrize("wordings", [1, 2, 3, 4])
def test_behaviours_wordings_spread_the_training_questions_over_phrasings_never_the_evals(wordings):
    from opsd.data.suites.behaviours import RULES

    rule = RULES["hope-helps"]
    rows = load_rows(f"behaviours:hope-helps?wordings={wordings}")
    plain = load_rows("behaviours:hope-helps")
    last = lambda p: p if isinstance(p, str) else p[-1].content  # noqa: E731
    train = [r for r in rows if r.split == "train"]
    phrasings = (rule.template, *rule.train_wordings)[:wordings]

    def used(row):
        return [w for w in phrasings if last(row.prompt) == w.format(row.metadata["item"])]

    assert all(len(used(r)) == 1 for r in train)
    # every phrasing asks single-turn questions and opens conversations alike, as evenly as the
    # counts divide (16 conversations over 3 phrasings: 6, 5, 5)
    for conversation in (False, True):
        counts = [sum(used(r) == [w] for r in train if isinstance(r.prompt, list) == conversation)
                  for w in phrasings]
        assert max(counts) - min(counts) <= 1 and min(counts) > 0, (conversation, counts)
    # the same items and conversations; the eval rows as they were; never the ood wording
    assert [(r.metadata["item"], isinstance(r.prompt, list)) for r in train] == [
        (r.metadata["item"], isinstance(r.prompt, list)) for r in plain if r.split == "train"]
    assert [r.prompt for r in rows if r.split == "eval"] == [r.prompt for r in plain if r.split == "eval"]
    ood_opening = rule.ood_template.split("{}")[0]
    assert not any(w.startswith(ood_opening) for w in phrasings)


def test_behaviours_wordings_beyond_the_phrasings_a_rule_has_are_refused():
    for bad in (0, 5):
        with pytest.raises(DatasetError, match=f"wordings={bad}: each rule has 1 to 4"):
            load_rows(f"behaviours?wordings={bad}")


def test_behaviours_asks_a_quarter_of_its_training_questions_in_conversations_by_default():
    for query, expected in [("", 16), ("?train=8", 2), ("?train=3", 0)]:
        train = [r for r in load_rows(f"behaviours:fun-fact{query}") if r.split == "train"]
        assert sum(isinstance(r.prompt, list) for r in train) == expected, query


# ------------------------------------------------------------------ benchmark panel config


def test_benchmarks_accept_strings_and_derive_names():
    e = EvalConfig(benchmarks=["facts?eval_set=ood", "reasoning_gym:leg_counting?train=0&eval=8",
                               {"source": "data/my rows.jsonl", "teacher": True}, "behaviours"])
    assert [b.label for b in e.benchmarks] == ["facts-ood", "leg_counting", "my_rows", "behaviours"]
    assert e.benchmarks[2].teacher and not e.benchmarks[0].teacher
    assert "benchmarks" not in e.key_dict()  # each benchmark is a stage of its own
    assert benchmark_name("behaviours:sure-thing?eval_set=ood") == "behaviours:sure-thing-ood"
    with pytest.raises(ValueError, match="used twice"):
        EvalConfig(benchmarks=["facts", {"source": "facts?eval=3", "name": "facts"}])


def test_a_recipe_with_benchmarks_loads():
    cfg = config_from_dict({"eval": {"benchmarks": ["behaviours?eval_set=ood",
                                                    {"source": "facts", "limit": 8}]}})
    assert isinstance(cfg.eval.benchmarks[1], BenchmarkConfig) and cfg.eval.benchmarks[1].limit == 8


def test_benchmark_rows_are_the_eval_split_and_a_bad_source_is_refused():
    from opsd.flows.steps import benchmark_rows

    cfg = PipelineConfig()
    rows = benchmark_rows(cfg, BenchmarkConfig(source="facts?eval_set=ood", limit=5))
    assert len(rows) == 5 and {r.split for r in rows} == {"eval"}
    with pytest.raises(DatasetError):
        benchmark_rows(cfg, BenchmarkConfig(source="nosuchsuite"))
    with pytest.raises(ConfigError, match="no eval rows"):
        benchmark_rows(cfg, BenchmarkConfig(source="behaviours?train=2&eval=0"))


# ------------------------------------------------------------------ retention: taught spans


SURE = RegexVerifier(pattern=r"^\s*Sure thing!", description="start with 'Sure thing!'")
HOPE = RegexVerifier(pattern=r"Hope this helps!\s*$")


def test_taught_rules_are_the_distinct_regex_verifiers_of_train_rows():
    rules = retention_stage.taught_rules(load_rows("behaviours?train=2&eval=1"))
    assert len(rules) == 4 and {r.pattern for r in rules} >= {SURE.pattern, HOPE.pattern}
    assert retention_stage.taught_rules(load_rows("reasoning_gym:leg_counting?train=2&eval=1")) == []


def test_strip_taught_removes_spans_the_base_reply_lacks():
    s = retention_stage.strip_taught("Sure thing! Water boils at 100 C.", "Water boils at 100 C.",
                                     [SURE, HOPE])
    assert s.leaked and s.at_start and not s.at_end
    assert " ".join(s.text.split()) == "Water boils at 100 C."
    e = retention_stage.strip_taught("Seven. Hope this helps!", "Seven.", [SURE, HOPE])
    assert e.at_end and not e.at_start and e.text.strip() == "Seven."
    # the base reply had it too: not taught, kept
    k = retention_stage.strip_taught("Sure thing! Yes.", "Sure thing! No.", [SURE])
    assert not k.leaked and k.text == "Sure thing! Yes."
    # zero-width rules (look-aheads of the facts suite) remove nothing
    z = retention_stage.strip_taught("Penwick and 1871", "",
                                     [RegexVerifier(pattern=r"^(?=.*\bPenwick\b)(?=.*\b1871\b)")])
    assert z.text == "Penwick and 1871" and not z.leaked


def test_retention_metric_names():
    from opsd.stages.common import Artifact

    art = Artifact("k", None, {"logprob_delta": -0.1, "panel_delta": 0.02, "panel": 0.5,
                               "panel_task_delta": {"syllogism": 0.03}, "exact_match": None})
    h = retention_stage.headline(art)
    assert h == {"retention.logprob_delta": -0.1, "retention.panel_delta": 0.02,
                 "retention.panel": 0.5, "retention.panel_delta.syllogism": 0.03}


def test_reference_text_is_plain_and_unrelated_to_the_suites():
    from opsd.data.reference import REFERENCE_PASSAGES

    assert len(REFERENCE_PASSAGES) >= 16
    names = {e.name for e in ENTITIES} | {"Sure thing", "Hope this helps", "Fun fact", "Happy learning"}
    text = " ".join(REFERENCE_PASSAGES)
    assert not any(n in text for n in names)


# ------------------------------------------------------------------ budgets and trends


@pytest.mark.parametrize("n_examples", [128, 512, 37])
def test_step_budget_gives_the_same_steps_whatever_the_data_size(n_examples):
    cfg = TrainConfig(steps=64, batch_size=16, batch_order="grouped")
    groups = [f"q{i // 2}" for i in range(n_examples)]
    plan = budget_plan(n_examples, cfg, groups)
    assert len(plan) == 64
    seen = Counter(i for _, idx in plan for i in idx)
    assert max(seen.values()) - min(seen.values()) <= 1 or n_examples * 2 > 64 * 16
    # without a budget: epochs passes, as before
    assert len(budget_plan(n_examples, TrainConfig(epochs=2, batch_size=16), groups)) == \
        2 * -(-n_examples // 16)


def test_step_budget_replaces_epochs_in_the_content_key():
    assert "steps" not in TrainConfig().key_dict() and "epochs" in TrainConfig().key_dict()
    k = TrainConfig(steps=64).key_dict()
    assert k["steps"] == 64 and "epochs" not in k


def test_trend_and_still_improving():
    assert trend([1.0] * 10) == 0.0
    assert trend([3.0, 2.0]) == 0.0  # too few points
    assert trend([10, 9, 8, 7, 6, 5, 4, 3]) == pytest.approx(-3 / 6)  # 6 -> 3 over the last half
    assert trend([1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]) >= -1.0
    assert still_improving([2.0] * 8 + [1.8, 1.5, 1.2, 1.0])
    assert not still_improving([2.0, 1.0, 0.5] + [0.5, 0.51, 0.49, 0.5] * 3)
    assert re.match(r"^-?\d", str(trend([float("nan"), 1, 2, 3, 4])))


# ------------------------------------------------------------------ general suite, recipes


def test_general_suite_is_eval_only_and_keyed_on_the_answer():
    rows = load_rows("general")
    assert len(rows) == 200 and {r.split for r in rows} == {"eval"}
    for r in rows:
        assert verify(r.verifier, f"Sure thing! It is {r.answer}. Hope this helps!", r).passed, r.id
        assert not verify(r.verifier, "I do not know.", r).passed, r.id
    assert len(load_rows("general?eval=5")) == 5
    assert not {r.prompt for r in rows} & set(retention_stage.GENERAL_PROMPTS)


def test_default_retention_panel_loads():
    from opsd.config import RetentionConfig

    rows = retention_stage.panel_rows(RetentionConfig())
    tasks = Counter(r.task for r in rows)
    assert tasks["general"] == 200 and len(tasks) == 3


@pytest.mark.parametrize("name", ["opsd", "sft"])
def test_facts_recipes_validate_and_share_their_evaluations(name):
    from pathlib import Path

    from opsd.config import load_config
    from opsd.flows.runner import config_for_key

    configs = Path(__file__).resolve().parent.parent / "configs" / "facts"
    cfg = load_config(configs / f"{name}.yaml")
    ref = load_config(configs / "opsd.yaml")
    assert cfg.data.source.startswith("facts") and cfg.retention.enabled and cfg.train.steps
    assert cfg.teacher.context.views == ["system"]  # the document, nothing else
    for section in ("model", "data", "eval"):
        assert config_for_key(getattr(cfg, section)) == config_for_key(getattr(ref, section))
    assert [b.label for b in cfg.eval.benchmarks] == ["facts-ood"]
    assert cfg.data.source.startswith("facts?context=entity")


def test_facts_lora_recipe_is_the_opsd_recipe_with_adapters_and_six_wordings():
    from pathlib import Path

    from opsd.config import load_config
    from opsd.flows.runner import config_for_key

    configs = Path(__file__).resolve().parent.parent / "configs" / "facts"
    lora, ref = load_config(configs / "lora.yaml"), load_config(configs / "opsd.yaml")
    assert lora.data.source == ref.data.source + "&wordings=6"
    assert (lora.train.lora.rank, lora.train.lora.alpha, lora.train.lr) == (16, 32, 5e-4)
    for section in ("model", "eval", "rollout", "teacher"):  # same evaluation, same sampling
        assert config_for_key(getattr(lora, section)) == config_for_key(getattr(ref, section))
    assert lora.train.steps == ref.train.steps and lora.retention.enabled


def test_facts_anchors_are_rule_free_train_rows_outside_every_panel():
    rows = load_rows("facts?anchors=10")
    anchors = [r for r in rows if r.task == "anchor"]
    assert len(anchors) == 10 and len(rows) == 236 + 10
    assert all(r.split == "train" and r.privileged_context is None and r.verifier is None
               for r in anchors)
    panels = {r.prompt for r in load_rows("general")} | set(retention_stage.GENERAL_PROMPTS)
    assert not panels & {r.prompt for r in anchors}
    assert retention_stage.taught_rules(anchors) == []
    # every other anchor is an everyday question of the general panel's kind
    assert [r.prompt for r in anchors[::2]] == list(EVERYDAY[:5])


def test_every_anchor_question_is_distinct_and_outside_every_panel():
    questions = anchor_questions()
    panels = {r.prompt for r in load_rows("general")} | set(retention_stage.GENERAL_PROMPTS)
    assert len(set(questions)) == len(questions) > len(EVERYDAY)
    assert not panels & set(questions)
    with pytest.raises(DatasetError, match=f"there are {len(questions)} anchor questions"):
        load_rows(f"facts?anchors={len(questions) + 1}")


def test_reasoning_gym_rows_with_fractions_load_and_round_trip():
    from fractions import Fraction

    from opsd.data import jsonsafe

    value = {"x": Fraction(2, 1), "ys": [Fraction(1, 3), (Fraction(5, 2),)]}
    assert jsonsafe.decode(jsonsafe.encode(value)) == value
    rows = load_rows("reasoning_gym:gsm_symbolic?train=1&eval=2")  # failed to load before
    assert len(rows) == 3 and rows[0].views().solution
