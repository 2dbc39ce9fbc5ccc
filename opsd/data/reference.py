"""Held-out reference text for the retention check (stages/retention.py).

Plain encyclopedic passages about everyday subjects, written for this project (no dataset
download) in the simple register a small instruct model handles well: SmolLM2-135M-Instruct
scores them at about −2 nats per token (measured in docs/quality.md), far better than text it
cannot model. None of them touches a built-in suite's topics (style rules, the fictional world of
``facts``), so a recipe that teaches those should leave their likelihood where it was: a drop is
forgetting. They are scored as plain text, outside any chat turn, so a reply-level style rule
("start every reply with 'Sure thing!'") has no position to act on.
"""

from __future__ import annotations

REFERENCE_PASSAGES: tuple[str, ...] = (
    "The sun is a star at the centre of our solar system. It is a huge ball of hot gas, mostly "
    "hydrogen and helium. The light from the sun takes about eight minutes to reach the Earth. "
    "Plants use sunlight to make their food, and the heat of the sun drives the weather.",
    "Water covers about seventy percent of the surface of the Earth. Most of it is salt water in "
    "the oceans. Fresh water is found in rivers, lakes, glaciers and under the ground. People need "
    "to drink water every day to stay healthy.",
    "A library is a place where books and other materials are kept for people to read or borrow. "
    "Many libraries also offer computers, newspapers and quiet rooms for study. Librarians help "
    "visitors find the information they are looking for.",
    "Bread is made from flour, water, salt and yeast. The yeast makes the dough rise by producing "
    "gas. After the dough has risen, it is shaped and baked in a hot oven until the crust turns "
    "golden brown.",
    "The heart is a muscle that pumps blood around the body. Blood carries oxygen and nutrients to "
    "the cells and takes away waste. Regular exercise helps to keep the heart strong and healthy.",
    "Trains are a common way to travel between cities. They run on tracks and can carry many "
    "passengers at once. Some modern trains travel at more than three hundred kilometres per hour.",
    "The moon orbits the Earth about once every twenty-seven days. It does not make its own light; "
    "it reflects the light of the sun. The shape of the moon seems to change during the month "
    "because we see different parts of its lit side.",
    "Bees are insects that live in large groups called colonies. They collect nectar and pollen "
    "from flowers. Bees make honey from nectar, and they help plants grow by carrying pollen from "
    "one flower to another.",
    "A computer is a machine that follows instructions to process information. It has a processor, "
    "memory and storage. People use computers to write documents, send messages, play games and "
    "search for information on the internet.",
    "Mountains are large landforms that rise high above the land around them. They are formed over "
    "millions of years when parts of the Earth's crust push against each other. The air is colder "
    "and thinner at the top of a high mountain.",
    "Exercise is good for both the body and the mind. Walking, swimming and cycling are simple ways "
    "to stay active. Doctors often recommend at least thirty minutes of activity on most days of "
    "the week.",
    "Rain forms when water vapour in the air cools and turns into tiny droplets. The droplets join "
    "together in clouds until they become heavy enough to fall. Rain gives plants and animals the "
    "water they need to live.",
    "The alphabet used to write English has twenty-six letters. Five of them are vowels: a, e, i, "
    "o and u. The other letters are called consonants. Children usually learn the alphabet before "
    "they learn to read.",
    "A farm is land used to grow crops or raise animals. Farmers plant seeds in the spring and "
    "harvest the crops later in the year. Common farm animals include cows, sheep, pigs and "
    "chickens.",
    "Music is made of sounds arranged in time. It can be played on instruments such as the piano, "
    "the guitar and the violin, or sung by voices. People listen to music to relax, to dance and "
    "to celebrate.",
    "Trees produce oxygen and take in carbon dioxide from the air. Their roots hold the soil in "
    "place, and their leaves give shade. Many animals, such as birds and squirrels, make their "
    "homes in trees.",
)
