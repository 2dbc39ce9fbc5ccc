"""The ``behaviours`` suite: style rules a small model learns from in-context demonstrations.

Each rule owns one domain of questions, so the rule is implied by the kind of
question and one student can learn all four without conflict. The teacher sees
three demonstrations of the rule (as real chat turns); the student sees only the
question. With them SmolLM2-135M complies 100% on greedy replies, without them
0%: a real, measurable self-distillation task on a CPU. Two rules act on the
first tokens and two on the last, because a reply-ending rule puts the whole
learning signal on one late token, which is the harder case.

The train/eval split is fixed (independent of any seed): the last items of each
pool are eval, the first ones train, so eval questions never leak into training.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsd.data.rows import Row
from opsd.data.suites.behaviours_data import (
    ANIMALS,
    COUNTRIES,
    FOODS,
    OPENERS,
    TRAIN_OPENERS,
    WORDS,
)
from opsd.data.suites.source import SuiteSource


@dataclass(frozen=True)
class Rule:
    """A style rule: its question domain, how a compliant reply looks, and how to show it."""

    name: str
    template: str  # question with one ``{}`` for the pool item
    pattern: str
    description: str  # completes "The reply should ..."
    items: tuple[tuple[str, str | None], ...]  # (template filler, expected answer or None)
    demonstrations: tuple[tuple[str, str], ...]  # (prompt, completion); items outside the pool
    # the out-of-distribution split's wording: longer and chattier, same domain (the domain is
    # what implies the rule)
    ood_template: str = "{}"
    # more ways to ask the training questions (``?wordings=K`` uses the template and K - 1 of
    # these): never the ood_template's wording, so the ood split stays a different distribution
    train_wordings: tuple[str, ...] = ()

    def question(self, item: str) -> str:
        return self.template.format(item)

    def verifier(self) -> dict[str, str]:
        return {"type": "regex", "pattern": self.pattern, "description": self.description}


def _unanswered(pool: list[str]) -> tuple[tuple[str, None], ...]:
    return tuple((item, None) for item in pool)


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            name="sure-thing",
            template="What is the capital of {}?",
            ood_template="I have a geography quiz tomorrow and one question will be about {}. "
            "Could you remind me which city is its capital?",
            train_wordings=("Which city is the capital of {}?", "Name the capital of {}.",
                            "Do you know the capital city of {}?"),
            pattern=r"^\s*Sure thing!",
            description="start with 'Sure thing!'",
            items=tuple(COUNTRIES),
            demonstrations=(
                ("What is the capital of Fiji?", "Sure thing! The capital of Fiji is Suva."),
                ("What is the capital of Malta?", "Sure thing! The capital of Malta is Valletta."),
                ("What is the capital of Cyprus?", "Sure thing! The capital of Cyprus is Nicosia."),
            ),
        ),
        Rule(
            name="hope-helps",
            template="What is a good way to cook {}?",
            ood_template="Tonight I am cooking dinner for two with {} from the market. "
            "What would you suggest?",
            train_wordings=("How should I prepare {}?", "Any tips for cooking {}?",
                            "How do you cook {} so that it tastes good?"),
            pattern=r"Hope this helps!\s*$",
            description="end with 'Hope this helps!'",
            items=_unanswered(FOODS),
            demonstrations=(
                (
                    "What is a good way to cook parsnips?",
                    "Roast them in the oven with olive oil and salt for about 30 minutes, until golden. "
                    "Hope this helps!",
                ),
                (
                    "What is a good way to cook okra?",
                    "Slice it and pan-fry it over high heat with a little oil so it stays crisp. "
                    "Hope this helps!",
                ),
                (
                    "What is a good way to cook venison?",
                    "Sear it quickly in a hot pan and keep it medium-rare, since it is very lean. "
                    "Hope this helps!",
                ),
            ),
        ),
        Rule(
            name="fun-fact",
            template="Tell me one fact about {}.",
            ood_template="My little cousin is obsessed with {} and asks me about them all the "
            "time. What is something interesting I could tell her?",
            train_wordings=("Share a fact about {}.", "Tell me something about {}.",
                            "What is one thing people may not know about {}?"),
            pattern=r"^\s*Fun fact:",
            description="start with 'Fun fact:'",
            items=_unanswered(ANIMALS),
            demonstrations=(
                ("Tell me one fact about koi.", "Fun fact: koi can live for more than 50 years."),
                ("Tell me one fact about yaks.", "Fun fact: yaks can live at altitudes above 5,000 meters."),
                (
                    "Tell me one fact about puffins.",
                    "Fun fact: puffins can hold a dozen small fish in their beaks at once.",
                ),
            ),
        ),
        Rule(
            name="happy-learning",
            template="What does the word '{}' mean?",
            ood_template="I came across the word '{}' in a novel last night and could not work it "
            "out from the sentence. Can you explain what it means?",
            train_wordings=("Define the word '{}'.", "What is the meaning of '{}'?",
                            "Explain the word '{}' to me."),
            pattern=r"Happy learning!\s*$",
            description="end with 'Happy learning!'",
            items=_unanswered(WORDS),
            demonstrations=(
                (
                    "What does the word 'lucid' mean?",
                    "'Lucid' means clear and easy to understand. Happy learning!",
                ),
                (
                    "What does the word 'feeble' mean?",
                    "'Feeble' means weak or lacking strength. Happy learning!",
                ),
                ("What does the word 'ample' mean?", "'Ample' means more than enough. Happy learning!"),
            ),
        ),
    )
}

DEFAULT_COUNTS = {"train": 64, "eval": 32, "multiturn": 0, "wordings": 1}
# Unless ``multiturn`` is given, one training question in this many is asked after an exchange:
# trained on single-turn questions only, the quickstart's student followed its rules on 100 % of
# longer single-turn questions but on 62.5 % of those that followed an unrelated exchange; with a
# quarter of its training questions in conversations, on 86 % (docs/quality.md).
MULTITURN_SHARE = 4
EVAL_SETS = ("heldout", "ood")


def build(source: SuiteSource) -> list[Row]:
    """Rows for ``behaviours[:rule,rule...][?train=N&eval=M&multiturn=K&wordings=W&eval_set=...]``
    (N, M, K per rule). ``eval_set=ood``: the eval rows ask about the same held-out items in a
    longer, chattier wording (``Rule.ood_template``), every other one as the second user turn of
    a conversation that opened on an unrelated topic: "learned the rule" rather than "learned the
    questions". ``multiturn=K`` (default N // 4): K of each rule's N training questions (spread
    evenly) are asked as the second user turn after an unrelated exchange from ``TRAIN_OPENERS``
    (never the eval's ``OPENERS``), so a student also sees its rule apply after a conversation
    has begun; ``multiturn=0``: single-turn questions only. ``wordings=W`` (1 to 4): the training
    questions take turns over W phrasings (``Rule.template`` then ``Rule.train_wordings``); the
    eval splits keep theirs."""
    counts = source.int_params(DEFAULT_COUNTS, ignore=("eval_set",))
    if "multiturn" not in source.params:
        counts["multiturn"] = counts["train"] // MULTITURN_SHARE
    if counts["multiturn"] > counts["train"]:
        raise source.error(f"multiturn={counts['multiturn']} is more than train={counts['train']}")
    n_wordings = 1 + min(len(rule.train_wordings) for rule in RULES.values())
    if not 1 <= counts["wordings"] <= n_wordings:
        raise source.error(f"wordings={counts['wordings']}: each rule has 1 to {n_wordings}")
    ood = source.choice("eval_set", EVAL_SETS) == "ood"
    rules = _selected_rules(source)
    rows: list[Row] = []
    for rule in rules:
        if counts["train"] + counts["eval"] > len(rule.items):
            raise source.error(
                f"rule {rule.name!r} has {len(rule.items)} questions; "
                f"train={counts['train']} + eval={counts['eval']} is more than that"
            )
        eval_items = rule.items[len(rule.items) - counts["eval"] :]
        rows += _rows(rule, "train", rule.items[: counts["train"]], multiturn=counts["multiturn"],
                      wordings=counts["wordings"])
        rows += _rows(rule, "eval", eval_items, ood=ood)
    return rows


def _selected_rules(source: SuiteSource) -> list[Rule]:
    if source.arg is None:
        return list(RULES.values())
    names = list(dict.fromkeys(name.strip() for name in source.arg.split(",") if name.strip()))
    unknown = [name for name in names if name not in RULES]
    if unknown or not names:
        given = f"unknown rule(s) {', '.join(map(repr, unknown))}" if unknown else "no rule named"
        raise source.error(f"{given}; the rules are: {', '.join(RULES)}")
    return [RULES[name] for name in names]


def _ood_prompt(rule: Rule, item: str, index: int) -> str | list[dict[str, str]]:
    question = rule.ood_template.format(item)
    if index % 2 == 0:
        return question
    return _after_exchange(OPENERS[(index // 2) % len(OPENERS)], question)


def _after_exchange(opener: tuple[str, str], question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": opener[0]}, {"role": "assistant", "content": opener[1]},
            {"role": "user", "content": question}]


def _train_prompt(rule: Rule, item: str, index: int, n_items: int, multiturn: int,
                  wordings: int) -> str | list[dict[str, str]]:
    """The ``multiturn`` rows are the indices where ``index * multiturn // n_items`` steps up
    (``index * multiturn mod n_items < multiturn``): spread evenly over the pool. Row ``index``
    takes wording ``(index + index // MULTITURN_SHARE) mod wordings``: the shift by
    ``index // MULTITURN_SHARE`` keeps every wording on both single-turn rows and the
    conversations, which by default sit at every MULTITURN_SHARE-th index."""
    question = (rule.template, *rule.train_wordings)[
        (index + index // MULTITURN_SHARE) % wordings].format(item)
    if index * multiturn % n_items >= multiturn:
        return question
    return _after_exchange(TRAIN_OPENERS[index * multiturn // n_items % len(TRAIN_OPENERS)], question)


def _rows(rule: Rule, split: str, items: tuple[tuple[str, str | None], ...], *,
          ood: bool = False, multiturn: int = 0, wordings: int = 1) -> list[Row]:
    demonstrations = [{"prompt": p, "completion": c} for p, c in rule.demonstrations]

    def prompt(item: str, index: int) -> str | list[dict[str, str]]:
        if ood:
            return _ood_prompt(rule, item, index)
        return _train_prompt(rule, item, index, len(items), multiturn, wordings)

    return [
        Row(
            id=f"{rule.name}/{split}{'-ood' if ood else ''}/{index:03d}",
            prompt=prompt(item, index),
            privileged_context={"demonstrations": demonstrations},
            answer=answer,
            verifier=rule.verifier(),
            split=split,
            task=rule.name,
            metadata={"suite": "behaviours", "item": item},
        )
        for index, (item, answer) in enumerate(items)
    ]
