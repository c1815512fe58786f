"""A trial's quality, item by item against the baseline, and the early-stop rule (plain functions).

Items are paired: each trial score sits beside the baseline's score on the same item, per task,
so that recovery (objectives/recovery.py) can resample them together. Two quality modes:

- ``fidelity``: an item's score is its top-1 agreement with the baseline's answer, teacher-forced
  (objectives/fidelity.py); the baseline agrees with itself, so its score is 1;
- ``labels``: an item's score is the task scorer's on the answer; a failed request scores 0.

Baseline items are the dicts the baseline run stores: ``id``, ``task``, ``label_score`` and
``positions`` (None for a repeat of a prompt compared already: fidelity compares each distinct
prompt once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from objectives.recovery import Gate, RecoveryEstimate, estimate_recovery
from objectives.scorers import get_scorer
from search.errors import SearchError

# (task, top-1 agreement, top-k KL) of one teacher-forced baseline item.
FidelityRow = tuple[str, float, float]
PairedScores = dict[str, tuple[list[float], list[float]]]  # task -> (trial scores, baseline scores)


class TrialPruned(SearchError):
    """Recovery after the first part of the workload shows the gate cannot be reached any more."""


class Answered(Protocol):
    id: str
    task: str
    answer: str
    error: str | None


class Labelled(Protocol):
    answers: Sequence[str]
    scorer: str


def paired_scores(quality: str, baseline_items: Sequence[Mapping], results: Sequence[Answered],
                  fidelity_rows: Sequence[FidelityRow], prompts: Mapping[str, Labelled]) -> PairedScores:
    """task -> (trial item scores, baseline item scores), paired; `prompts` by id hold the labels."""
    per_task: PairedScores = {}
    if quality == "fidelity":
        for task, agreement, _ in fidelity_rows:
            trial_scores, base_scores = per_task.setdefault(task, ([], []))
            trial_scores.append(agreement)
            base_scores.append(1.0)
        return per_task
    by_id = {item["id"]: item for item in baseline_items}
    for result in results:
        item = by_id.get(result.id)
        if item is None:
            continue
        prompt = prompts[result.id]
        trial_scores, base_scores = per_task.setdefault(result.task, ([], []))
        trial_scores.append(0.0 if result.error else get_scorer(prompt.scorer)(result.answer, list(prompt.answers)))
        base_scores.append(item["label_score"])
    return per_task


def recovery_by_task(paired: PairedScores, seed: int) -> dict[str, RecoveryEstimate]:
    return {task: estimate_recovery(t, b, task=task, seed=seed) for task, (t, b) in paired.items()}


def check_reachable(gate: Gate, quality: str, baseline_items: Sequence[Mapping], results: Sequence[Answered],
                    fidelity_rows: Sequence[FidelityRow], prompts: Mapping[str, Labelled],
                    trial_ids: Sequence[str]) -> None:
    """Raise TrialPruned when even a perfect score on every remaining item leaves mean recovery
    under the gate. `trial_ids` are the prompts the whole workload sends (labels mode)."""
    per_task = paired_scores(quality, baseline_items, results, fidelity_rows, prompts)
    if not per_task:
        return
    # Per task: how many items the whole workload has and the baseline's total score on them.
    totals: dict[str, list[float]] = {}
    wanted = None if quality == "fidelity" else set(trial_ids)
    for item in baseline_items:
        if (item["positions"] is not None) if wanted is None else item["id"] in wanted:
            count_and_sum = totals.setdefault(item["task"], [0, 0.0])
            count_and_sum[0] += 1
            count_and_sum[1] += 1.0 if wanted is None else item["label_score"]
    best = []
    for task, (count, base_sum) in totals.items():
        trial_scores = per_task.get(task, ([], []))[0]
        if base_sum <= 0:
            return  # the final scoring reports this task's zero baseline as an error
        best.append((sum(trial_scores) + (count - len(trial_scores))) / base_sum)
    best_possible = sum(best) / len(best)
    if best_possible < gate.threshold:
        seen = sum(len(t) for t, _ in per_task.values())
        raise TrialPruned(f"after {seen} of {sum(c for c, _ in totals.values())} items mean recovery can "
                          f"reach at most {best_possible:.3f} < gate {gate.threshold}")
