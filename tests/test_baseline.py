"""The baseline is a typed record (search.trial.Baseline) whose JSON file keeps the format it always
had: files written before the record existed load, and a new one is the same JSON object."""

import json

from search import trial
from search.trial import Baseline

ITEM = {"id": "t/1", "task": "t", "answer": "Paris", "positions": None, "completion_tokens": 3, "label_score": 1.0}


def test_an_old_baseline_file_loads_and_writes_back_the_same(tmp_path):
    old = {"key": "abc", "reference": {"compress.scheme": "none"}, "items": [ITEM], "spent": {"time_serve_s": 2.0}}
    baseline = Baseline.from_json(json.loads(json.dumps(old)))
    assert baseline.key == "abc" and baseline.items == [ITEM] and baseline.spent == {"time_serve_s": 2.0}
    assert json.dumps(baseline.to_json()) == json.dumps(old)  # same keys, same order
    assert baseline.for_the_bill() == {"reference": {"compress.scheme": "none"}, "spent": {"time_serve_s": 2.0}}


def test_a_baseline_made_before_its_stages_were_metered_has_no_spent():
    baseline = Baseline.from_json({"key": "abc", "reference": {"compress.scheme": "none"}, "items": [ITEM]})
    assert baseline.spent is None
    assert baseline.for_the_bill() == {"reference": {"compress.scheme": "none"}}  # as the dict gave it


def test_a_cached_baseline_file_is_read_not_made(tmp_path):
    (tmp_path / "baseline-k.json").write_text(json.dumps({"key": "k", "reference": {}, "items": [ITEM], "spent": {}}))

    class Runtime:  # nothing else is touched when the file exists
        workdir = tmp_path

    baseline = trial.load_or_make_baseline(Runtime(), "k", lambda name: None)
    assert isinstance(baseline, Baseline) and baseline.items == [ITEM]
