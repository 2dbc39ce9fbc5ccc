"""The ``general`` suite: everyday general-knowledge questions a small instruct model answers well.

A general-capability check for the retention panel and ``eval.benchmarks``: short questions about
science, arithmetic, language and everyday life, each with a verifier that looks for the answer's
key word(s) anywhere in the reply (case-insensitive, whole words), so a style rule a recipe
teaches ("start with 'Sure thing!'") cannot fail a correct reply. None of them overlaps a built-in
suite's domain (capitals, cooking, animal facts, word meanings, the fictional world of ``facts``)
or the retention check's rule-free prompts. All rows are eval rows (nothing here is trained on).
"""

from __future__ import annotations

from opsd.data.rows import Row
from opsd.data.suites.source import SuiteSource

# (question, key regex, the answer as written)
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("What is the chemical formula of water?", r"H2O|H₂O", "H2O"),
    ("How many days are there in a week?", r"seven|7", "seven"),
    ("How many hours are there in a day?", r"24|twenty-four", "24"),
    ("What is 7 plus 5?", r"12|twelve", "12"),
    ("What is 10 minus 3?", r"7|seven", "7"),
    ("What is 6 times 7?", r"42|forty-two", "42"),
    ("What is half of 20?", r"10|ten", "10"),
    ("How many months are there in a year?", r"12|twelve", "12"),
    ("Which planet do we live on?", r"Earth", "Earth"),
    ("What is the closest star to the Earth?", r"sun", "the Sun"),
    ("What natural satellite orbits the Earth?", r"moon", "the Moon"),
    ("Which planet is known as the Red Planet?", r"Mars", "Mars"),
    ("What do plants need from the sun to grow?", r"light|sunlight|energy", "light"),
    ("What is frozen water called?", r"ice", "ice"),
    ("What is the opposite of hot?", r"cold", "cold"),
    ("What is the opposite of up?", r"down", "down"),
    ("What is the plural of 'mouse'?", r"mice", "mice"),
    ("What is the past tense of 'go'?", r"went", "went"),
    ("What color do you get by mixing blue and yellow?", r"green", "green"),
    ("What color are ripe bananas?", r"yellow", "yellow"),
    ("What is the color of fresh grass?", r"green", "green"),
    ("Which animal is known as man's best friend?", r"dogs?", "the dog"),
    ("What do cows drink when they are thirsty?", r"water", "water"),
    ("What do caterpillars turn into?", r"butterfl(y|ies)|moths?", "butterflies"),
    ("Which body part do we use to see?", r"eyes?", "the eyes"),
    ("Which body part do we use to hear?", r"ears?", "the ears"),
    ("How many fingers are there on one human hand?", r"five|5", "five"),
    ("What organ do humans use to breathe?", r"lungs?", "the lungs"),
    ("What is the largest ocean on Earth?", r"Pacific", "the Pacific"),
    ("What is the hardest natural substance?", r"diamonds?", "diamond"),
    ("Which season is the coldest of the year?", r"winter", "winter"),
    ("In which season do leaves fall from trees?", r"autumn|fall", "autumn"),
    ("What do you call a baby cat?", r"kittens?", "a kitten"),
    ("What do you call a baby dog?", r"pupp(y|ies)", "a puppy"),
    ("How many legs does an insect have?", r"six|6", "six"),
    ("How many sides does a square have?", r"four|4", "four"),
    ("How many wheels does a bicycle have?", r"two|2", "two"),
    ("What do we call the meal eaten in the morning?", r"breakfast", "breakfast"),
    ("What tool do people use to tell the time?", r"clocks?|watch(es)?", "a clock"),
    ("What do you use to write on a blackboard?", r"chalk", "chalk"),
    ("Who wrote the novel 'Pride and Prejudice'?", r"Austen", "Jane Austen"),
    ("Who painted the Mona Lisa?", r"Leonardo|da Vinci", "Leonardo da Vinci"),
    ("What is the boiling point of water in degrees Celsius?", r"100|one hundred", "100"),
    ("What is the main language spoken in France?", r"French", "French"),
    ("What device do people use to make phone calls?", r"phones?|telephones?|smartphones?",
     "a phone"),
    ("What gas do plants give off during photosynthesis?", r"oxygen|O2", "oxygen"),
    ("What is the largest land animal?", r"elephants?", "the elephant"),
    ("How many minutes are there in one hour?", r"60|sixty", "60"),
)


def build(source: SuiteSource) -> list[Row]:
    """Rows for ``general[?eval=N]`` (all eval rows; at most N, in order)."""
    counts = source.int_params({"eval": len(QUESTIONS)})
    if source.arg is not None:
        raise source.error("the general suite takes no ':' argument")
    return [
        Row(id=f"general/eval/{i:03d}", prompt=q, answer=answer,
            verifier={"type": "regex", "pattern": rf"\b({key})\b", "flags": "i",
                      "description": f"mention {answer}"},
            split="eval", task="general", metadata={"suite": "general"})
        for i, (q, key, answer) in enumerate(QUESTIONS[: counts["eval"]])
    ]
