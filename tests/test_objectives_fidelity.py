import math
from types import SimpleNamespace

import pytest

from objectives.fidelity import answer_agreement, top1_agreement, topk_kl

L = math.log
BASELINE = [None, {1: -0.1, 2: -2.5, 3: -4.0}, {5: L(0.7), 6: L(0.3)}]


def test_identical_models_agree_fully():
    assert top1_agreement(BASELINE, BASELINE) == 1.0
    assert topk_kl(BASELINE, BASELINE) == pytest.approx(0.0, abs=1e-12)


def test_server_json_and_logprob_objects_match_plain_floats():
    # vLLM's OpenAI server: string token ids, {"logprob", "rank", ...} values.
    server = [
        None,
        {
            "1": {"logprob": -0.1, "rank": 1, "decoded_token": "a"},
            "2": {"logprob": -2.5, "rank": 2},
            "3": {"logprob": -4.0, "rank": 3},
        },
        {"5": {"logprob": L(0.7), "rank": 1}, "6": {"logprob": L(0.3), "rank": 2}},
    ]
    objects = [None] + [{k: SimpleNamespace(logprob=v) for k, v in pos.items()} for pos in BASELINE[1:]]
    for trial in (server, objects):
        assert top1_agreement(BASELINE, trial) == 1.0
        assert topk_kl(BASELINE, trial) == pytest.approx(0.0, abs=1e-12)


def test_top1_disagreement():
    trial = [None, {1: -0.1, 2: -2.5}, {6: -0.2, 5: -1.8}]
    assert top1_agreement(BASELINE, trial) == 0.5


def test_kl_hand_computed():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    expected = 0.5 * L(4 / 3)
    assert topk_kl([{"a": L(0.5), "b": L(0.5)}], [{"a": L(0.75), "b": L(0.25)}]) == pytest.approx(expected)
    # Both sides are renormalised over the baseline's tokens: only relative mass matters.
    assert topk_kl([{"a": L(0.3), "b": L(0.3)}], [{"a": L(0.6), "b": L(0.2), "z": L(0.1)}]) == pytest.approx(
        expected
    )


def test_kl_floor_for_tokens_missing_from_trial():
    baseline = [{"a": L(0.5), "b": L(0.5)}]
    trial = [{"a": L(0.5), "c": L(0.25)}]
    # "b" gets min(trial) - ln 2 = ln(1/8): q = (1/2, 1/8) -> (4/5, 1/5).
    expected = 0.5 * L(0.5 / 0.8) + 0.5 * L(0.5 / 0.2)
    assert topk_kl(baseline, trial) == pytest.approx(expected)
    assert topk_kl(baseline, trial, floor_logprob=L(0.5)) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_mean_over_positions_and_ignores_infinite_logprobs():
    one = topk_kl([{"a": L(0.5), "b": L(0.5)}], [{"a": L(0.75), "b": L(0.25)}])
    two = topk_kl(
        [{"a": L(0.5), "b": L(0.5)}, {"x": 0.0}],
        [{"a": L(0.75), "b": L(0.25)}, {"x": 0.0}],
    )
    assert two == pytest.approx(one / 2)
    # -inf for "a" is dropped, so "a" falls back to the floor (0 - ln 2) rather than making KL infinite.
    kl = topk_kl([{"a": L(0.5), "b": L(0.5)}], [{"a": float("-inf"), "b": 0.0}])
    assert kl == pytest.approx(0.5 * L(0.5 / (1 / 3)) + 0.5 * L(0.5 / (2 / 3)))


def test_positions_with_none_are_skipped():
    baseline = [None, {1: -0.1, 2: -3.0}, {1: -0.1, 2: -3.0}]
    trial = [{1: -0.1}, None, {2: -0.1, 1: -3.0}]
    assert top1_agreement(baseline, trial) == 0.0  # only the last position counts


def test_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="positions"):
        top1_agreement(BASELINE, BASELINE[:2])
    with pytest.raises(ValueError, match="positions"):
        topk_kl(BASELINE, BASELINE[:2])
    with pytest.raises(ValueError, match="both sides"):
        topk_kl([None, {}], [{1: 0.0}, None])


def test_answer_agreement():
    baseline = ["Paris", "3", None, "circle"]
    trial = ["paris.", "three", "x", "The circle"]
    assert answer_agreement(baseline, trial) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        answer_agreement(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        answer_agreement([None], ["a"])


def test_argmax_ties_do_not_depend_on_dict_order():
    assert top1_agreement([{5: -0.7, 6: -0.7}], [{6: -0.7, 5: -0.7}]) == 1.0


def test_a_trial_compares_each_distinct_prompt_once(monkeypatch):
    """More requests than task items repeat prompts; the baseline keeps positions for the first of
    each only, and the trial teacher-forces those alone."""
    from search import trial as trial_stages, workload
    from search.config import WorkloadConfig

    calls = []

    def forced(base_url, model, prompt, answer, settings):
        calls.append(prompt.id)
        return BASELINE

    monkeypatch.setattr(workload, "teacher_forced_logprobs", forced)
    prompt = workload.Prompt("t/1", "t", "hi", None, ("a",), "exact")
    items = [{"id": "t/1", "task": "t", "answer": "x", "positions": BASELINE, "completion_tokens": 1},
             {"id": "t/1", "task": "t", "answer": "y", "positions": None, "completion_tokens": 1}]
    server = SimpleNamespace(base_url="http://unused", served_name="m")
    rows = trial_stages._fidelity(server, items, {"t/1": prompt}, WorkloadConfig(max_tokens=8))
    assert calls == ["t/1"] and rows == [("t", 1.0, pytest.approx(0.0, abs=1e-12))]


def test_the_baseline_teacher_forces_only_the_first_fidelity_items_distinct_prompts(monkeypatch, tmp_path):
    """A job of many distinct prompts is scored on workload.fidelity_items of them: each forced prompt
    costs a forward pass in the baseline and in every trial."""
    import contextlib

    from search import trial as trial_stages, workload
    from search.config import build

    prompts = [workload.Prompt(f"t/{i}", "t", f"q{i}", None, ("a",), "exact_match") for i in range(6)]
    forced = []
    monkeypatch.setattr(workload, "warm_up", lambda *a: [])
    monkeypatch.setattr(workload, "run", lambda url, model, ps, settings: [
        workload.RequestResult(p.id, p.task, "a", 3, 1, 0.1, 0.05) for p in ps])
    monkeypatch.setattr(workload, "teacher_forced_logprobs",
                        lambda url, model, prompt, answer, settings: forced.append(prompt.id) or BASELINE)
    server = SimpleNamespace(base_url="http://unused", served_name="m", engine_error=lambda: None)
    runtime = SimpleNamespace(reference=build({"workload.fidelity_items": 4, "workload.n_requests": 6}),
                              pool=SimpleNamespace(get=lambda *a: (server, False)), base_model=tmp_path,
                              workdir=tmp_path, energy_source="estimate", platform=None,
                              prompts=lambda settings: prompts)
    monkeypatch.setattr(trial_stages, "engine_args", lambda runtime, config: {})
    with contextlib.ExitStack() as cleanup:
        baseline = trial_stages._make_baseline(runtime, "k", tmp_path / "baseline.json", lambda name: None, cleanup)
    assert forced == ["t/0", "t/1", "t/2", "t/3"]
    assert [item["positions"] is not None for item in baseline.items] == [True] * 4 + [False] * 2


def test_a_fixed_job_of_generated_tasks_sends_distinct_prompts(tmp_path):
    """An evaluation repeats no prompt: a builtin task makes as many items as the job sends, so no
    request finds its prompt in a prefix cache that a real job would not have warmed."""
    from search import workload
    from search.config import WorkloadConfig

    many = workload.load_prompts(WorkloadConfig(n_requests=70), tmp_path)
    assert len({p.id for p in many}) == 70 and len({p.image_png for p in many}) == 70
    few = workload.load_prompts(WorkloadConfig(n_requests=8), tmp_path)
    assert [p.id for p in few] == [p.id for p in many[:8]]  # small jobs draw the same first items as before
