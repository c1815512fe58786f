"""A trial's item scores paired with the baseline's, in both quality modes, and the early-stop rule
on small hand-made baselines."""

import pytest

from objectives.recovery import Gate
from objectives.scoring import TrialPruned, check_reachable, paired_scores, recovery_by_task
from search.workload import Prompt, RequestResult

POSITIONS = [{1: -0.1}]  # any teacher-forced positions: the item is a distinct prompt


def fidelity_baseline(tasks: dict[str, int]) -> list[dict]:
    """`n` distinct items per task, and one repeat of each task's first (compared once, never scored)."""
    items = []
    for task, n in tasks.items():
        items += [{"id": f"{task}/{i}", "task": task, "positions": POSITIONS} for i in range(n)]
        items.append({"id": f"{task}/0", "task": task, "positions": None})
    return items


def labelled(task: str, labels: dict[str, float]) -> tuple[list[dict], dict[str, Prompt]]:
    """Baseline items with their label scores, and prompts whose right answer is 'yes'."""
    items = [{"id": i, "task": task, "positions": POSITIONS, "label_score": s} for i, s in labels.items()]
    return items, {i: Prompt(i, task, "q", None, ("yes",), "exact_match") for i in labels}


def answer(item_id: str, text: str, error: str | None = None) -> RequestResult:
    return RequestResult(item_id, item_id.split("/")[0], text, 5, 1, 0.1, 0.01, error)


def test_fidelity_pairs_each_row_with_the_baselines_perfect_agreement():
    rows = [("a", 0.5, 0.1), ("b", 1.0, 0.0), ("a", 0.25, 0.2)]
    assert paired_scores("fidelity", fidelity_baseline({"a": 2, "b": 1}), [], rows, {}) == {
        "a": ([0.5, 0.25], [1.0, 1.0]), "b": ([1.0], [1.0])}


def test_labels_pair_the_trials_scores_with_the_baselines_and_a_failed_request_scores_zero():
    items, prompts = labelled("t", {"t/1": 1.0, "t/2": 0.0, "t/3": 1.0})
    prompts["x/9"] = Prompt("x/9", "x", "q", None, ("yes",), "exact_match")
    results = [answer("t/1", "yes"), answer("t/2", "yes"), answer("t/3", "", error="ReadTimeout"),
               answer("x/9", "yes")]  # x/9: not a baseline item, so not scored
    assert paired_scores("labels", items, results, [("t", 0.3, 0.0)], prompts) == {
        "t": ([1.0, 1.0, 0.0], [1.0, 0.0, 1.0])}


def test_recovery_by_task_is_the_ratio_of_mean_scores():
    estimates = recovery_by_task({"a": ([0.5, 0.5], [1.0, 1.0]), "b": ([1.0, 0.0], [1.0, 1.0])}, seed=0)
    assert (estimates["a"].point, estimates["b"].point) == (0.5, 0.5)


def test_fidelity_screen_prunes_when_perfect_remaining_items_cannot_reach_the_gate():
    items = fidelity_baseline({"a": 4})
    # 2 of 4 items agree 0: at best (0 + 0 + 1 + 1) / 4 = 0.5.
    with pytest.raises(TrialPruned, match=r"after 2 of 4 items mean recovery can reach at most 0.500 < gate 0.8"):
        check_reachable(Gate(0.8), "fidelity", items, [], [("a", 0.0, 0.0), ("a", 0.0, 0.0)], {}, [])
    # 1.0 and 0.5: at best (1.5 + 2) / 4 = 0.875, still reachable.
    assert check_reachable(Gate(0.8), "fidelity", items, [], [("a", 1.0, 0.0), ("a", 0.5, 0.0)], {}, []) is None
    with pytest.raises(TrialPruned, match="at most 0.875 < gate 0.9"):
        check_reachable(Gate(0.9), "fidelity", items, [], [("a", 1.0, 0.0), ("a", 0.5, 0.0)], {}, [])


def test_fidelity_screen_averages_the_best_possible_recovery_over_tasks():
    items = fidelity_baseline({"a": 2, "b": 2})
    # a: (0 + 1) / 2 = 0.5 at best; b, not screened yet: 1.0; mean 0.75.
    with pytest.raises(TrialPruned, match="after 1 of 4 items mean recovery can reach at most 0.750"):
        check_reachable(Gate(0.8), "fidelity", items, [], [("a", 0.0, 0.0)], {}, [])


def test_labels_screen_counts_only_the_items_the_workload_sends_and_the_baselines_score():
    # The baseline solves 3 of the 4 items the workload sends; t/9 is not sent.
    items, prompts = labelled("t", {"t/1": 1.0, "t/2": 1.0, "t/3": 1.0, "t/4": 0.0, "t/9": 1.0})
    sent = ["t/1", "t/2", "t/3", "t/4"]
    # Both screened answers wrong: at best (0 + 2) / 3 = 0.667.
    with pytest.raises(TrialPruned, match=r"after 2 of 4 items mean recovery can reach at most 0.667 < gate 0.8"):
        check_reachable(Gate(0.8), "labels", items, [answer("t/1", "no"), answer("t/2", "no")], [], prompts, sent)
    # One right: at best (1 + 2) / 3 = 1.0.
    assert check_reachable(Gate(0.8), "labels", items, [answer("t/1", "yes"), answer("t/2", "no")], [], prompts,
                           sent) is None


def test_no_screened_item_or_a_zero_baseline_leaves_the_decision_to_the_final_score():
    assert check_reachable(Gate(0.99), "fidelity", fidelity_baseline({"a": 4}), [], [], {}, []) is None
    items, prompts = labelled("t", {"t/1": 0.0, "t/2": 0.0})
    assert check_reachable(Gate(0.99), "labels", items, [answer("t/1", "no")], [], prompts, ["t/1", "t/2"]) is None
