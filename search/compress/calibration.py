"""The project's built-in calibration set: deterministic chat-style texts, no download needed."""

from __future__ import annotations

import random

_SUBJECTS = ["the receipt", "the invoice", "the chart", "the photo", "the diagram", "the form", "the scene"]
_QUESTIONS = ["What is the total amount?", "How many red circles are there?", "What shape is the blue object?",
              "Which store issued it?", "What date is printed at the top?", "Describe it in one sentence.",
              "Which option is correct: A, B, C or D?", "What is the largest value shown?"]
_ANSWERS = ["The total is $42.10.", "There are three red circles.", "It is a triangle.", "Corner Market.",
            "March 3, 2024.", "A table with two cups and a plate.", "The answer is C.", "The largest value is 87."]


def builtin_texts(n: int, seed: int) -> list[str]:
    """n short user/model exchanges in Gemma 4's turn format."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        q, a = rng.randrange(len(_QUESTIONS)), rng.randrange(len(_ANSWERS))
        texts.append(f"<|turn>user\nLook at {rng.choice(_SUBJECTS)}. {_QUESTIONS[q]}<turn|>\n"
                     f"<|turn>model\n{_ANSWERS[a]}<turn|>\n")
    return texts
