"""Issue 27 item 1: every door validated like the space file. Each bad input of the corpus
(tests/data/bad_inputs/cases.yaml) is refused by the real CLI as one line on stderr, exit status 2,
no traceback, and leaves its home as it was (no folder made, no empty database). How fast each
refusal is belongs to bench/bad_inputs.py, not to the test."""

import pytest

from bad_input_corpus import cases, make_study_db, run_case

CASES = cases()


@pytest.fixture(scope="session")
def study_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("study-db") / "optuna.db"
    make_study_db(path)
    return path


def test_the_corpus_covers_every_door():
    for case in CASES:
        assert {"id", "argv", "expect"} <= set(case) <= {"id", "argv", "expect", "home", "home_via", "env"}, case
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)) >= 25
    prefixes = {i.split("-")[0] for i in ids}
    assert {"trials", "set", "space", "presets", "preset", "task", "storage", "mlflow", "gpus", "hf", "status",
            "show", "export", "compress"} <= prefixes
    assert {"study", "empty", "file", "missing"} <= {case.get("home", "missing") for case in CASES}
    assert any(case.get("env") for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_a_bad_input_is_refused_in_one_line(case, tmp_path, study_db):
    outcome = run_case(case, tmp_path, study_db)
    shown = f"{outcome.argv}\n{outcome.stderr[-3000:]}"
    assert outcome.returncode == 2, shown
    assert "Traceback" not in outcome.stderr, shown
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: ") and case["expect"] in lines[0], shown
    assert "secret" not in outcome.stderr
    # No folder made, no empty database; a study's database byte for byte as it was.
    assert outcome.home_after == outcome.home_before, f"the refusal changed its home: {shown}"
