"""A built-in, offline text task suite that a small trained instruct model answers at a useful rate.

Four tasks, each a list of (id, question, answers) rows, deterministic from a seed:

* ``arithmetic``: single-digit sums, "3 + 4" (the prompt template asks for the number only);
* ``capitals``: well-known countries' capitals;
* ``opposites``: everyday adjectives and their common antonym;
* ``plurals``: regular English nouns.

SmolLM2-135M-Instruct's accuracy on each is measured in bench/results/ (bench/README.md); tasks it
rarely answered (successor numbers, unit conversions, weekday order, upper-casing) were left out,
since recovery against a reference that scores near 0 is noise.
"""

from __future__ import annotations

import random

TASKS = ("arithmetic", "capitals", "opposites", "plurals")
ARITHMETIC_ITEMS = 81  # every ordered pair of digits 1-9

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("England", "London"), ("Greece", "Athens"),
    ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Czech Republic", "Prague"),
    ("Iceland", "Reykjavik"), ("Scotland", "Edinburgh"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"), ("happy", "sad"),
    ("old", "new"), ("wet", "dry"), ("light", "dark"), ("hard", "soft"), ("open", "closed"), ("full", "empty"),
    ("rich", "poor"), ("early", "late"), ("strong", "weak"), ("tall", "short"), ("clean", "dirty"),
    ("loud", "quiet"), ("thick", "thin"), ("win", "lose"), ("good", "bad"), ("black", "white"),
    ("in", "out"), ("left", "right"), ("high", "low"), ("near", "far"), ("heavy", "light"), ("push", "pull"),
    ("young", "old"), ("true", "false"), ("cheap", "expensive"), ("wide", "narrow"), ("first", "last"),
    ("inside", "outside"), ("love", "hate"), ("sweet", "sour"), ("start", "end"), ("yes", "no"),
    ("above", "below"), ("alive", "dead"),
)
PLURAL_NOUNS = (
    "cat", "dog", "book", "tree", "car", "bird", "cup", "pen", "hat", "star", "apple", "river", "garden",
    "window", "pencil", "monkey", "candle", "planet", "forest", "bridge", "rocket", "guitar", "dragon",
    "island", "mirror", "chair", "table", "house", "road", "flower", "horse", "ship", "door", "lamp",
    "train", "cloud", "shoe", "bottle", "ring", "girl",
)


def rows(task: str, seed: int = 0) -> list[dict[str, object]]:
    """Every row of ``task``; ``seed`` shuffles the order (subsampling takes prefixes of it)."""
    if task == "arithmetic":
        items = [(f"{a} + {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    elif task == "capitals":
        items = list(CAPITALS)
    elif task == "opposites":
        items = list(OPPOSITES)
    elif task == "plurals":
        items = [(noun, noun + "s") for noun in PLURAL_NOUNS]
    else:
        raise ValueError(f"unknown text task {task!r}; known: {TASKS}")
    random.Random(seed).shuffle(items)
    return [{"id": f"{task}-{i:03d}", "question": question, "answers": [answer]}
            for i, (question, answer) in enumerate(items)]
