"""The fictional world of the built-in ``facts`` suite: 16 entities × 3 attributes = 48 facts.

Four kinds of entity — people, towns, products, companies — linked to each other (a person was
born in a town and invented a product; a company makes a product, was founded by a person and
has its headquarters in a town), so the world reads as one consistent document. Every name is
invented and every number arbitrary: nothing here can be known by a model from its pre-training.

Each attribute has question templates: ``train`` phrasings (what the student is trained on),
``more`` training phrasings (three further wordings, trained on only with ``facts?wordings=4..6``),
one held-out ``paraphrase`` (different wording, same direction), an ``ood`` phrasing (a longer,
chattier question, used inside multi-turn conversations by the out-of-distribution split) and,
where the value is itself an entity, a ``reverse`` question that asks for the subject given the
value. ``key`` is the token(s) a correct reply must contain (case-insensitive, whole word).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attribute:
    """How one kind of fact is stated in the document and asked about."""

    sentence: str  # the document's sentence; {s} subject, {v} value
    train: tuple[str, ...]  # training questions about {s}
    paraphrase: str  # held-out wording about {s}
    ood: str  # held-out, longer and chattier wording about {s}
    reverse: str | None = None  # held-out question about {v} whose answer is the subject
    joint: str = ""  # noun phrase for two-fact questions ("the year {s} was born")
    more: tuple[str, ...] = ()  # further training questions, after `train` (facts?wordings=N)


# kind → attribute name → Attribute
ATTRIBUTES: dict[str, dict[str, Attribute]] = {
    "person": {
        "hometown": Attribute(
            "{s} was born in the town of {v}.",
            ("Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?"),
            "Which town does {s} come from originally?",
            "My friend keeps mentioning {s} and I realised I have no idea where this person was "
            "born. Which town was it?",
            reverse="Who was born in the town of {v}?",
            joint="the town where {s} was born",
            more=("Tell me where {s} was born.", "What town was {s} born in?",
                  "Do you know the hometown of {s}?"),
        ),
        "year": Attribute(
            "{s} was born in the year {v}.",
            ("In which year was {s} born?", "What year was {s} born?", "When was {s} born?"),
            "What is the birth year of {s}?",
            "I am writing a short biography and need one detail: the year {s} was born. "
            "Do you know it?",
            joint="the year {s} was born",
            more=("{s} was born in which year?", "Do you know when {s} was born?",
                  "In what year did {s} come into the world?"),
        ),
        "invention": Attribute(
            "{s} invented the {v}.",
            ("What did {s} invent?", "Which device did {s} invent?", "What is {s} known for inventing?"),
            "Which invention is credited to {s}?",
            "We talked about inventors in class today and {s} came up. "
            "What was the thing this person invented?",
            reverse="Who invented the {v}?",
            joint="what {s} invented",
            more=("What was invented by {s}?", "{s} invented which device?",
                  "Can you tell me what {s} invented?"),
        ),
    },
    "town": {
        "river": Attribute(
            "The town of {s} lies on the river {v}.",
            ("Which river flows through {s}?", "On which river does {s} lie?",
             "What is the name of the river in {s}?"),
            "Name the river that the town of {s} is built on.",
            "I am planning a walk along the water when I visit {s} next summer. "
            "Which river runs through that town?",
            reverse="Which town lies on the river {v}?",
            joint="the river {s} lies on",
            more=("What river is {s} on?", "{s} lies on which river?",
                  "Which river is {s} situated on?"),
        ),
        "population": Attribute(
            "The town of {s} has {v} inhabitants.",
            ("How many people live in {s}?", "What is the population of {s}?",
             "How many inhabitants does {s} have?"),
            "How large is the population of the town of {s}?",
            "For a school project about small towns I need the number of people living in "
            "{s}. What is it?",
            joint="how many people live in {s}",
            more=("What is the number of inhabitants of {s}?", "How many residents does {s} have?",
                  "{s} has how many inhabitants?"),
        ),
        "landmark": Attribute(
            "The best-known landmark of {s} is the {v}.",
            ("What is the most famous landmark in {s}?", "What is {s} best known for?",
             "Which landmark is {s} famous for?"),
            "What do visitors to {s} usually go to see first?",
            "My aunt just got back from a trip to {s} and told me to guess what she saw "
            "there. What is the famous landmark of that town?",
            reverse="In which town is the {v}?",
            joint="the famous landmark of {s}",
            more=("Which sight is {s} known for?", "Name the best-known landmark in {s}.",
                  "What is the main sight of {s}?"),
        ),
    },
    "product": {
        "maker": Attribute(
            "The {s} is made by {v}.",
            ("Which company makes the {s}?", "Who manufactures the {s}?", "Who makes the {s}?"),
            "The {s} is produced by which company?",
            "I found an old {s} in my grandfather's attic and want to contact the maker. "
            "Which company produces it?",
            reverse="Which product is made by {v}?",
            joint="the company that makes the {s}",
            more=("What company is the {s} made by?", "Who is the manufacturer of the {s}?",
                  "Which firm builds the {s}?"),
        ),
        "launch": Attribute(
            "The {s} first went on sale in {v}.",
            ("When did the {s} first go on sale?", "In which year was the {s} launched?",
             "What year did the {s} come out?"),
            "In what year could people first buy the {s}?",
            "Collectors say early models of the {s} are valuable. "
            "In which year was it first sold?",
            joint="the year the {s} first went on sale",
            more=("When was the {s} launched?", "In which year did the {s} reach the shops?",
                  "When did the {s} come onto the market?"),
        ),
        "price": Attribute(
            "The {s} costs {v} crowns.",
            ("How much does the {s} cost?", "What is the price of the {s}?",
             "How many crowns does the {s} cost?"),
            "What would I have to pay for the {s}, in crowns?",
            "I am saving up my pocket money because I really want a {s}. "
            "How many crowns do I need for it?",
            joint="the price of the {s}",
            more=("What does the {s} cost?", "How many crowns is the {s}?",
                  "What is the price of the {s} in crowns?"),
        ),
    },
    "company": {
        "founder": Attribute(
            "{s} was founded by {v}.",
            ("Who founded {s}?", "Who is the founder of {s}?", "Who started the company {s}?"),
            "Which person established the company {s}?",
            "I am applying for a job at {s} and want to know a bit of its history. "
            "Who founded the company?",
            reverse="Which company did {v} found?",
            joint="who founded {s}",
            more=("By whom was {s} founded?", "Who set up {s}?", "Who created the company {s}?"),
        ),
        "headquarters": Attribute(
            "{s} has its headquarters in {v}.",
            ("Where is {s} headquartered?", "In which town is the headquarters of {s}?",
             "Where are the head offices of {s}?"),
            "Which town is home to the main office of {s}?",
            "I need to send a letter to the head office of {s}. "
            "In which town should I address it?",
            reverse="Which company has its headquarters in {v}?",
            joint="the town where {s} has its headquarters",
            more=("Where does {s} have its headquarters?", "In what town is {s} based?",
                  "Which town are the headquarters of {s} in?"),
        ),
        "employees": Attribute(
            "{s} employs {v} people.",
            ("How many people work at {s}?", "How many employees does {s} have?",
             "What is the number of employees of {s}?"),
            "How big is the workforce of {s}?",
            "A recruiter from {s} called me today. Roughly how many people work for that "
            "company?",
            joint="how many people work at {s}",
            more=("How many people does {s} employ?", "How many workers are on the payroll of {s}?",
                  "How many staff does {s} have?"),
        ),
    },
}


@dataclass(frozen=True)
class Entity:
    kind: str
    name: str  # as written in the document and the questions
    key: str  # the token(s) that identify it in a reply (a reverse question's answer)
    values: dict[str, tuple[str, str]]  # attribute → (value as written, key token(s) to check)


ENTITIES: tuple[Entity, ...] = (
    # people: hometown (a town below), birth year, invention (a product below)
    Entity("person", "Orla Penwick", "Penwick", {
        "hometown": ("Dunmarrow", "Dunmarrow"), "year": ("1871", "1871"),
        "invention": ("Glimmerpod", "Glimmerpod")}),
    Entity("person", "Tobias Quellan", "Quellan", {
        "hometown": ("Velkrest", "Velkrest"), "year": ("1846", "1846"),
        "invention": ("Zentrovax", "Zentrovax")}),
    Entity("person", "Mira Santhollow", "Santhollow", {
        "hometown": ("Quillby", "Quillby"), "year": ("1903", "1903"),
        "invention": ("Brisklet", "Brisklet")}),
    Entity("person", "Edric Vaunt", "Vaunt", {
        "hometown": ("Harrowmere", "Harrowmere"), "year": ("1928", "1928"),
        "invention": ("Corvantine", "Corvantine")}),
    # towns: river, population, landmark
    Entity("town", "Dunmarrow", "Dunmarrow", {
        "river": ("Olvane", "Olvane"), "population": ("7420", "7,?420"),
        "landmark": ("Copper Stair", "Copper Stair")}),
    Entity("town", "Velkrest", "Velkrest", {
        "river": ("Tessaly", "Tessaly"), "population": ("3185", "3,?185"),
        "landmark": ("Glass Orchard", "Glass Orchard")}),
    Entity("town", "Quillby", "Quillby", {
        "river": ("Brannock", "Brannock"), "population": ("9260", "9,?260"),
        "landmark": ("Whistling Tower", "Whistling Tower")}),
    Entity("town", "Harrowmere", "Harrowmere", {
        "river": ("Sillow", "Sillow"), "population": ("5710", "5,?710"),
        "landmark": ("Lantern Bridge", "Lantern Bridge")}),
    # products: maker (a company below), launch year, price in crowns
    Entity("product", "Glimmerpod", "Glimmerpod", {
        "maker": ("Halvex Works", "Halvex"), "launch": ("1897", "1897"),
        "price": ("46", "46")}),
    Entity("product", "Zentrovax", "Zentrovax", {
        "maker": ("Pellmark", "Pellmark"), "launch": ("1869", "1869"),
        "price": ("83", "83")}),
    Entity("product", "Brisklet", "Brisklet", {
        "maker": ("Tamberline", "Tamberline"), "launch": ("1931", "1931"),
        "price": ("19", "19")}),
    Entity("product", "Corvantine", "Corvantine", {
        "maker": ("Orrindale Foundry", "Orrindale"), "launch": ("1952", "1952"),
        "price": ("64", "64")}),
    # companies: founder (a person above), headquarters (a town above), employees
    Entity("company", "Halvex Works", "Halvex", {
        "founder": ("Orla Penwick", "Penwick"), "headquarters": ("Velkrest", "Velkrest"),
        "employees": ("312", "312")}),
    Entity("company", "Pellmark", "Pellmark", {
        "founder": ("Tobias Quellan", "Quellan"), "headquarters": ("Quillby", "Quillby"),
        "employees": ("1450", "1,?450")}),
    Entity("company", "Tamberline", "Tamberline", {
        "founder": ("Mira Santhollow", "Santhollow"), "headquarters": ("Harrowmere", "Harrowmere"),
        "employees": ("275", "275")}),
    Entity("company", "Orrindale Foundry", "Orrindale", {
        "founder": ("Edric Vaunt", "Vaunt"), "headquarters": ("Dunmarrow", "Dunmarrow"),
        "employees": ("890", "890")}),
)

# Two-fact questions: the two attributes asked together about one subject (per kind).
JOINT_PAIRS: dict[str, tuple[str, str]] = {
    "person": ("hometown", "year"),
    "town": ("river", "landmark"),
    "product": ("maker", "launch"),
    "company": ("founder", "employees"),
}

# An earlier exchange that opens the multi-turn out-of-distribution questions: a different
# topic, so the fact question comes second in a real conversation.
OOD_OPENERS: tuple[tuple[str, str], ...] = (
    ("Can you suggest a name for a small cafe?", "How about 'The Morning Cup'?"),
    ("What is a good way to stay focused while studying?",
     "Work in short blocks of 25 minutes with a 5-minute break in between."),
    ("Give me a word that rhymes with 'light'.", "'Bright' rhymes with 'light'."),
    ("How many hours of sleep do adults need?", "Most adults need about 7 to 9 hours a night."),
)
