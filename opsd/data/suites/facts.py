"""The ``facts`` suite: knowledge the teacher reads in a document and the student must internalise.

A generated fictional world (:mod:`opsd.data.suites.facts_data`: 48 facts about invented people,
towns, products and companies) is the teacher's ``system`` view — a document in a real system
turn, rendered through the chat template. The student sees only the question.

Splits (fixed, independent of any seed):

* ``train`` — every fact asked in its three training phrasings (144 rows, task ``recall``);
  ``?wordings=N`` (1-6) asks it in N (``wordings=6``: 288 rows; the further three wordings
  differ from every held-out one — how much more of the knowledge reaches the paraphrases when
  the student is trained on more ways of asking: docs/quality.md);
* ``eval`` (``facts`` or ``facts?eval_set=heldout``) — questions never trained on:
  ``paraphrase`` (every fact in a fourth wording, 48 rows), ``reverse`` (the subject asked for
  from an entity-valued fact: "Who invented the Glimmerpod?", 28 rows) and ``compose`` (two
  facts of one subject in one question, 16 rows);
* ``facts?eval_set=ood`` — the out-of-distribution split: every fact asked in a longer, chattier
  wording as the second user turn of a conversation that opened on another topic (48 rows,
  task ``ood``). Its train rows are the usual ones, so it can be evaluated as a benchmark.

A reply passes when it contains the fact's key token(s) as whole words, case-insensitively
(both facts' keys for ``compose``). ``?context=entity`` gives the teacher only the section of the
document about the entity asked about (a retrieval-style context: shorter, easier to copy from)
instead of the whole world.

``?anchors=N`` adds N *anchor* rows to the train split: questions unrelated to the world (task
``anchor``; half of them everyday questions of the general panel's kind, half the behaviours
suite's questions) with no privileged context, so the teacher reads exactly what the student reads
and its targets are the frozen base model's own distribution — a KL-to-base term on unrelated
prompts inside the same objective. Trained on fact questions alone, the student learns to answer
*every* question from the fictional world ("the largest ocean is the Olvane"); the anchors keep
its other answers where they were (docs/quality.md has both measured).
"""

from __future__ import annotations

from opsd.data.rows import Row
from opsd.data.suites.anchors_data import EVERYDAY
from opsd.data.suites.behaviours import RULES
from opsd.data.suites.facts_data import ATTRIBUTES, ENTITIES, JOINT_PAIRS, OOD_OPENERS, Entity
from opsd.data.suites.source import SuiteSource

EVAL_SETS = ("heldout", "ood")
CONTEXTS = ("world", "entity")
INTRO = ("You are the archivist of the town records of the Vell valley. Answer questions using "
         "the records below.")


def facts() -> list[tuple[Entity, str]]:
    """Every (entity, attribute) fact, in document order."""
    return [(e, a) for e in ENTITIES for a in ATTRIBUTES[e.kind]]


def section(entity: Entity) -> str:
    """The document's paragraph about one entity."""
    return " ".join(ATTRIBUTES[entity.kind][a].sentence.format(s=entity.name, v=entity.values[a][0])
                    for a in ATTRIBUTES[entity.kind])


def document(entities: tuple[Entity, ...] = ENTITIES) -> str:
    """The world as the teacher reads it: an intro line and one paragraph per entity."""
    return INTRO + "\n\n" + "\n".join(f"- {section(e)}" for e in entities)


def key_pattern(*keys: str) -> str:
    """A regex that finds every key as a whole word (in any order), case-insensitively."""
    if len(keys) == 1:
        return rf"\b{keys[0]}\b"
    return "^" + "".join(rf"(?=.*\b{k}\b)" for k in keys)


def build(source: SuiteSource) -> list[Row]:
    """Rows for ``facts[?eval_set=heldout|ood&context=world|entity&anchors=N&wordings=N]``."""
    eval_set = source.choice("eval_set", EVAL_SETS)
    context = source.choice("context", CONTEXTS)
    ints = source.int_params({"anchors": 0, "wordings": 3}, ignore=("eval_set", "context"))
    n_anchors, wordings = ints["anchors"], ints["wordings"]
    most = min(len(a.train) + len(a.more) for kind in ATTRIBUTES.values() for a in kind.values())
    if not 1 <= wordings <= most:
        raise source.error(f"wordings={wordings}: every fact has 1 to {most} training wordings")
    if n_anchors > (available := len(anchor_questions())):
        raise source.error(f"anchors={n_anchors}: there are {available} anchor questions")
    if source.arg is not None:
        raise source.error("the facts suite takes no ':' argument")
    world = document()

    def row(rid: str, prompt, keys: tuple[str, ...], answer: str, split: str, task: str,
            entity: Entity, fact: str) -> Row:
        return Row(
            id=f"facts/{rid}", prompt=prompt,
            privileged_context={"system": world if context == "world" else
                                INTRO + "\n\n- " + section(entity)},
            answer=answer,
            verifier={"type": "regex", "pattern": key_pattern(*keys), "flags": "is",
                      "description": f"mention {answer}"},
            split=split, task=task,
            metadata={"suite": "facts", "entity": entity.name, "fact": fact},
        )

    rows: list[Row] = []
    for i, (entity, attr) in enumerate(facts()):
        spec, (value, key) = ATTRIBUTES[entity.kind][attr], entity.values[attr]
        for j, template in enumerate((spec.train + spec.more)[:wordings]):
            rows.append(row(f"train/{i:02d}-{j}", template.format(s=entity.name), (key,), value,
                            "train", "recall", entity, attr))
    rows += anchors(n_anchors)
    if eval_set == "ood":
        for i, (entity, attr) in enumerate(facts()):
            spec, (value, key) = ATTRIBUTES[entity.kind][attr], entity.values[attr]
            q, a = OOD_OPENERS[i % len(OOD_OPENERS)]
            prompt = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                      {"role": "user", "content": spec.ood.format(s=entity.name)}]
            rows.append(row(f"ood/{i:02d}", prompt, (key,), value, "eval", "ood", entity, attr))
        return rows
    for i, (entity, attr) in enumerate(facts()):
        spec, (value, key) = ATTRIBUTES[entity.kind][attr], entity.values[attr]
        rows.append(row(f"paraphrase/{i:02d}", spec.paraphrase.format(s=entity.name), (key,),
                        value, "eval", "paraphrase", entity, attr))
    for i, (entity, attr) in enumerate(facts()):
        spec, (value, _) = ATTRIBUTES[entity.kind][attr], entity.values[attr]
        if spec.reverse is not None:
            rows.append(row(f"reverse/{i:02d}", spec.reverse.format(v=value), (entity.key,),
                            entity.name, "eval", "reverse", entity, attr))
    for i, entity in enumerate(ENTITIES):
        a, b = JOINT_PAIRS[entity.kind]
        spec_a, spec_b = ATTRIBUTES[entity.kind][a], ATTRIBUTES[entity.kind][b]
        question = (f"Tell me {spec_a.joint.format(s=entity.name)} and "
                    f"{spec_b.joint.format(s=entity.name)}.")
        keys = (entity.values[a][1], entity.values[b][1])
        answer = f"{entity.values[a][0]}; {entity.values[b][0]}"
        rows.append(row(f"compose/{i:02d}", question, keys, answer, "eval", "compose", entity,
                        f"{a}+{b}"))
    return rows


def anchor_questions() -> list[str]:
    """Every anchor question in order: :data:`~opsd.data.suites.anchors_data.EVERYDAY` (the
    general panel's kind) alternating with the four question pools of the ``behaviours`` suite
    (capitals, cooking, animals, word meanings, in turn, without its demonstrations); once one
    side runs out, the other alone. Nothing in them is the fictional world's, and none is in the
    ``general`` panel or the retention prompts."""
    pools = [[rule.question(item) for item, _ in rule.items] for rule in RULES.values()]
    others = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    short = min(len(EVERYDAY), len(others))
    return ([q for pair in zip(EVERYDAY, others) for q in pair]
            + list(EVERYDAY[short:]) + others[short:])


def anchors(n: int) -> list[Row]:
    """The first ``n`` anchor questions as train rows without privileged context."""
    return [Row(id=f"facts/anchor/{i:03d}", prompt=q,
                split="train", task="anchor", metadata={"suite": "facts", "anchor": True})
            for i, q in enumerate(anchor_questions()[:n])]
