"""Per-item answer scorers: ``score(prediction, references) -> float`` in [0, 1].

Predictions come from compressed models that can fail in odd ways (empty output, None from a
failed request, run-away repetition), so every scorer returns 0.0 for malformed output rather
than raising: one bad item must not abort a search trial.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable

# Outputs past this length are treated as run-away generation and score 0; it also bounds the
# cost of the regexes and the edit distance below.
MAX_PREDICTION_CHARS = 32_768

_ARTICLES = ("a ", "an ", "the ")
_SURROUNDING = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_CURRENCY = "$€£¥"
_WRITTEN_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")

Scorer = Callable[[str, list[str]], float]


def _valid_prediction(prediction: object) -> str | None:
    """The prediction as a str, or None when it cannot be scored (None, non-str, too long)."""
    if not isinstance(prediction, str) or len(prediction) > MAX_PREDICTION_CHARS:
        return None
    return prediction


def _references(references: Iterable[object] | str) -> list[str]:
    # A bare string is a single reference, not a sequence of one-character references.
    if isinstance(references, str):
        return [references]
    return [r if isinstance(r, str) else str(r) for r in references if r is not None]


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and one leading article."""
    text = " ".join(text.lower().split()).strip(_SURROUNDING)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :].strip(_SURROUNDING)
            break
    return text


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    pred = normalize_answer(pred)
    if not pred:
        return 0.0
    return float(any(pred == normalize_answer(r) for r in _references(references)))


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _nls(pred: str, ref: str, threshold: float) -> float:
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 0.0
    # The edit distance is at least the length difference, so a large difference already puts
    # the normalised distance past the threshold: skip the quadratic computation.
    if abs(len(pred) - len(ref)) / longest >= threshold:
        return 0.0
    distance = _levenshtein(pred, ref) / longest
    return 1.0 - distance if distance < threshold else 0.0


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS for one item: max over references of 1 - NL if NL < threshold else 0.

    NL is the Levenshtein distance over the longer length, on lower-cased, whitespace-collapsed
    strings (as in the DocVQA evaluation).
    """
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    pred = " ".join(pred.lower().split())
    if not pred:
        return 0.0
    refs = [" ".join(r.lower().split()) for r in _references(references)]
    return max((_nls(pred, r, threshold) for r in refs), default=0.0)


def parse_number(text: str) -> float | None:
    """A number written as the whole of ``text``: "1,234", "12.5%", "$3", "-0.5." -> float.

    "%" is treated as a unit and dropped (ChartQA labels percentages without it). Returns None
    for anything else, including "nan"/"inf", so they fall back to string comparison.
    """
    text = text.strip().rstrip(".").strip()
    text = text.removesuffix("%").strip().lstrip(_CURRENCY).strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _NUMBER.fullmatch(text):
        return None
    return float(text)


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within ``tolerance`` relative error, else exact match."""
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    pred_number = parse_number(pred)
    for ref in _references(references):
        ref_number = parse_number(ref)
        if pred_number is not None and ref_number is not None:
            # A zero target has no relative scale; only an exact zero matches it.
            if ref_number == 0.0:
                if pred_number == 0.0:
                    return 1.0
            elif abs(pred_number - ref_number) / abs(ref_number) <= tolerance:
                return 1.0
        elif exact_match(pred, [ref]):
            return 1.0
    return 0.0


_LETTERS = "ABCDEFGHIJ"
# Markup models wrap a letter in: "(C)", "**B**", "[D]", "C.", "C)".
_WRAPPED_LETTER = re.compile(r"[\s(\[*_`'\"]*([A-Ja-j])[\s)\]*_`'\".:]*")
# A lower-case letter counts only where it ends the phrase ("Answer: d"), so that "the answer is
# a bit unclear" does not read as option A.
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*(?:(?i:option)\s*)?[:\-]?\s*[(\[*_`'\"]*\s*"
    r"([A-J](?![A-Za-z0-9])|[a-j](?=\s*$|[.,:;!)\]*_`'\"]))"
)
_LEADING_OPTION = re.compile(r"[\s(\[*]*([A-J])(?:[.)\]:]|\*\*)\s")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-J])(?![A-Za-z0-9'])")


def parse_choice(text: str) -> str | None:
    """The option letter A-J chosen in free text, or None when absent or ambiguous.

    In order: the whole reply is one (possibly decorated) letter; the last "answer is X" /
    "Answer: x"; a reply starting with "B. ..." or "(B) ..."; a single distinct capital letter
    standing alone in the text (other than the pronoun "I"). Lower-case letters count only in the
    first two forms, where they cannot be ordinary words.
    """
    whole = _WRAPPED_LETTER.fullmatch(text)
    if whole:
        return whole.group(1).upper()
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return phrases[-1].upper()
    leading = _LEADING_OPTION.match(text)
    if leading:
        return leading.group(1)
    # A lone "I" is far more often the pronoun than option I.
    standalone = set(_STANDALONE.findall(text)) - {"I"}
    return standalone.pop() if len(standalone) == 1 else None


def multiple_choice(prediction: str, references: list[str]) -> float:
    """1.0 if the letter parsed from the prediction is one of the reference letters."""
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    choice = parse_choice(pred)
    if choice is None:
        return 0.0
    letters = {parse_choice(r.strip()) for r in _references(references)}
    return float(choice in letters)


def contains(prediction: str, references: list[str]) -> float:
    """1.0 if any normalised reference occurs in the normalised prediction as whole words: a chatty
    small model answers "The capital of France is Paris." to a one-word question."""
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    text = " ".join(pred.lower().split())
    for ref in _references(references):
        ref = normalize_answer(ref)
        if ref and re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", text):
            return 1.0
    return 0.0


def last_number(prediction: str, references: list[str]) -> float:
    """1.0 if the last number written in the prediction equals a reference number ("3 + 4 = 7." -> 7),
    as GSM8K-style graders read a worked answer."""
    pred = _valid_prediction(prediction)
    if pred is None:
        return 0.0
    numbers = _WRITTEN_NUMBER.findall(pred)
    value = parse_number(numbers[-1].rstrip(",")) if numbers else None
    return float(value is not None and any(parse_number(r) == value for r in _references(references)))


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "multiple_choice": multiple_choice,
    "contains": contains,
    "last_number": last_number,
}


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}") from None
