import pytest

from objectives.scorers import (
    MAX_PREDICTION_CHARS,
    SCORERS,
    anls,
    exact_match,
    get_scorer,
    multiple_choice,
    normalize_answer,
    parse_choice,
    parse_number,
    relaxed_accuracy,
)

MALFORMED = [None, "", "   ", "...", 42, b"C", ["C"], "x" * (MAX_PREDICTION_CHARS + 1)]


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("prediction", MALFORMED, ids=repr)
def test_malformed_predictions_score_zero(name, prediction):
    assert SCORERS[name](prediction, ["C", "x", "0", ""]) == 0.0


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_no_references_scores_zero(name):
    assert SCORERS[name]("C", []) == 0.0


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_long_output_of_the_answer_repeated_scores_zero(name):
    # A run-away repetition of the right answer is still a failed generation.
    assert SCORERS[name]("C " * MAX_PREDICTION_CHARS, ["C"]) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  The  Eiffel   Tower. ", "eiffel tower"),
        ("A circle", "circle"),
        ("an apple!", "apple"),
        ("$12.50", "12.50"),
        ("“quoted”", "quoted"),
        ("theory", "theory"),  # only a whole leading article goes
        ("a", "a"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("Paris", ["paris"], 1.0),
        ("  The  Eiffel Tower. ", ["eiffel tower"], 1.0),
        ("$12.50", ["12.50"], 1.0),
        ("a circle", ["square", "circle"], 1.0),
        ("12.5", ["12.50"], 0.0),
        ("circles", ["circle"], 0.0),
        ("Paris, France", ["paris"], 0.0),
        ("CORNER PHARMACY", ["Corner Pharmacy"], 1.0),
        ("circle", "circle", 1.0),  # a bare string reference is one reference
    ],
)
def test_exact_match(prediction, references, expected):
    assert exact_match(prediction, references) == expected


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("Lorem ipsum", ["lorem ipsum"], 1.0),
        ("lorem ipsum", ["lorem ipsu"], 1 - 1 / 11),
        ("kitten", ["sitting"], 1 - 3 / 7),
        ("abcde", ["abxye"], 1 - 2 / 5),
        ("abcd", ["abxy"], 0.0),  # NL = 0.5 is not below the threshold
        ("color", ["xyz", "colour"], 1 - 1 / 6),  # max over references
        ("  PARIS ", ["paris"], 1.0),
        ("a much longer answer than the reference", ["short"], 0.0),
    ],
)
def test_anls(prediction, references, expected):
    assert anls(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", 1234.0),
        ("12.5%", 12.5),
        ("$3", 3.0),
        ("-0.5.", -0.5),
        (" 7 ", 7.0),
        (".5", 0.5),
        ("1,23", None),
        ("nan", None),
        ("inf", None),
        ("3 apples", None),
        ("", None),
        ("1e5", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        ("1,234", ["1200"], 1.0),  # 2.8% off
        ("1300", ["1200"], 0.0),  # 8.3% off
        ("1.04", ["1"], 1.0),
        ("1.06", ["1"], 0.0),
        ("12.5%", ["12.5"], 1.0),
        ("$3", ["3.1"], 1.0),
        ("0", ["0"], 1.0),
        ("0.01", ["0"], 0.0),  # no relative scale around zero
        ("Yes", ["yes"], 1.0),  # non-numeric: exact match
        ("No", ["yes"], 0.0),
        ("nan", ["5"], 0.0),
        ("The answer is 5", ["5"], 0.0),  # the whole output must be the number
        ("1200", ["north", "1210"], 1.0),
    ],
)
def test_relaxed_accuracy(prediction, references, expected):
    assert relaxed_accuracy(prediction, references) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("C", "C"),
        ("c", "C"),
        ("(C)", "C"),
        ("**B**", "B"),
        ("B.", "B"),
        ("The answer is (C).", "C"),
        ("Answer: d", "D"),
        ("The correct answer is **E** because it fits.", "E"),
        ("Answer is option G", "G"),
        ("It could be A, but the answer is J.", "J"),
        ("B. Paris, because it is the capital.", "B"),
        ("(B) Paris", "B"),
        ("I think C is right", "C"),
        ("the answer is a bit unclear", None),
        ("A good choice is C", None),  # article "A" vs C: ambiguous
        ("K", None),  # outside A-J
        ("I don't know", None),
        ("no letter here", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_multiple_choice():
    assert multiple_choice("The answer is (C).", ["C"]) == 1.0
    assert multiple_choice("The answer is (C).", ["B"]) == 0.0
    assert multiple_choice("Answer: d", ["D"]) == 1.0
    assert multiple_choice("b", ["(B)"]) == 1.0
    assert multiple_choice("reasoning... " * 500 + "The answer is E", ["E"]) == 1.0
    assert multiple_choice("the answer is a bit unclear", ["A"]) == 0.0


def test_get_scorer():
    assert get_scorer("anls") is anls
    with pytest.raises(ValueError, match="exact_match.*multiple_choice|multiple_choice.*exact_match"):
        get_scorer("bleu")
