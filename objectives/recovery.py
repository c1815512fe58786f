"""Quality recovery of a compressed trial relative to the uncompressed baseline, and the gate on it.

Recovery is ``trial score / baseline score`` per task. Its bootstrap interval resamples items in
pairs (the same items for trial and baseline), so item difficulty cancels out of the ratio.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.stats

from search.errors import SearchError


class BaselineZeroError(SearchError, ValueError):
    """The baseline scored 0 on a task, so recovery relative to it is undefined."""

    def __init__(self, task: str):
        super().__init__(
            f"baseline score is 0 on task {task!r}: recovery is undefined; "
            "drop the task or use one the baseline can solve"
        )
        self.task = task


@dataclass(frozen=True)
class RecoveryEstimate:
    point: float
    low: float
    high: float


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    # >= 0 when feasible; feed ``-margin`` to Optuna as a constraint (feasible when <= 0).
    margin: float
    reason: str


def recovery(score: float, baseline: float, task: str = "<unnamed>") -> float:
    """``score / baseline``; BaselineZeroError naming ``task`` when the baseline is 0."""
    if baseline == 0:
        raise BaselineZeroError(task)
    return score / baseline


def per_task_recovery(scores: Mapping[str, float], baselines: Mapping[str, float]) -> dict[str, float]:
    """Recovery for every task; the two mappings must cover the same tasks."""
    if set(scores) != set(baselines):
        missing = sorted(set(scores) ^ set(baselines))
        raise ValueError(f"scores and baselines cover different tasks; unmatched: {missing}")
    return {task: recovery(scores[task], baselines[task], task) for task in scores}


def _paired_arrays(trial: Sequence[float], baseline: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(trial, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if t.ndim != 1 or t.shape != b.shape:
        raise ValueError(f"item scores must be paired 1-d sequences; got shapes {t.shape} and {b.shape}")
    if t.size == 0:
        raise ValueError("no item scores")
    return t, b


def bootstrap_interval(
    trial_item_scores: Sequence[float],
    baseline_item_scores: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    task: str = "<unnamed>",
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of mean(trial) / mean(baseline).

    Items are resampled with replacement, the same indices for both sides. Resamples whose
    baseline mean is 0 have no ratio and are dropped; with a baseline that solves few items the
    interval is then conditional on the baseline solving at least one resampled item.
    """
    t, b = _paired_arrays(trial_item_scores, baseline_item_scores)
    if b.mean() == 0:
        raise BaselineZeroError(task)
    if t.size == 1:  # every resample is the one item (scipy asks for two)
        return float(t[0] / b[0]), float(t[0] / b[0])
    with warnings.catch_warnings():  # a dropped resample makes scipy's interval NaN, and it warns
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap((t, b), _mean_ratio, n_resamples=n_resamples, vectorized=True, paired=True,
                                       confidence_level=1 - alpha, method="percentile",
                                       **{_SEED_ARGUMENT: np.random.default_rng(seed)})
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):  # resamples without a ratio: the interval of those with one
        low, high = np.nanquantile(result.bootstrap_distribution, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _mean_ratio(trial: np.ndarray, baseline: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(trial) / mean(baseline) along `axis`; NaN where the baseline's mean is 0."""
    t_means, b_means = trial.mean(axis=axis), baseline.mean(axis=axis)
    return np.divide(t_means, b_means, out=np.full_like(t_means, np.nan), where=b_means != 0)


# scipy 1.15 renamed `random_state` to `rng` (the same Generator, the same resamples).
_SEED_ARGUMENT = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def estimate_recovery(
    trial_item_scores: Sequence[float],
    baseline_item_scores: Sequence[float],
    task: str = "<unnamed>",
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> RecoveryEstimate:
    """Point recovery (ratio of mean item scores) with its paired bootstrap interval."""
    t, b = _paired_arrays(trial_item_scores, baseline_item_scores)
    point = recovery(float(t.mean()), float(b.mean()), task)
    low, high = bootstrap_interval(t, b, n_resamples=n_resamples, seed=seed, alpha=alpha, task=task)
    return RecoveryEstimate(point=point, low=low, high=high)


@dataclass(frozen=True)
class Gate:
    """Feasibility of a trial: mean recovery over tasks >= threshold, and optionally every task's
    recovery >= per_task_min.

    ``use='lower'`` judges each task by its bootstrap lower bound instead of its point estimate;
    the mean of lower bounds is a conservative stand-in for a lower bound of the mean.
    """

    threshold: float = 0.8
    use: Literal["point", "lower"] = "point"
    per_task_min: float | None = None

    @property
    def can_prune(self) -> bool:
        """Whether a partial score can ever show a trial below this gate (recovery is never negative)."""
        return self.threshold > 0

    def __post_init__(self) -> None:
        if self.use not in ("point", "lower"):
            raise ValueError(f"Gate.use must be 'point' or 'lower', got {self.use!r}")

    def evaluate(self, per_task: Mapping[str, RecoveryEstimate]) -> GateOutcome:
        if not per_task:
            raise ValueError("Gate.evaluate needs at least one task")
        values = {task: (est.point if self.use == "point" else est.low) for task, est in per_task.items()}
        mean = sum(values.values()) / len(values)
        # Each constraint as (slack, description); the smallest slack binds.
        constraints = [
            (
                mean - self.threshold,
                f"mean recovery ({self.use}) {mean:.4f} vs threshold {self.threshold:.4f}",
            )
        ]
        if self.per_task_min is not None:
            constraints += [
                (
                    value - self.per_task_min,
                    f"task {task!r} recovery ({self.use}) {value:.4f}"
                    f" vs per-task min {self.per_task_min:.4f}",
                )
                for task, value in sorted(values.items())
            ]
        margin, binding = min(constraints, key=lambda c: c[0])
        passed = margin >= 0
        return GateOutcome(
            passed=passed, margin=margin, reason=f"{'passed' if passed else 'failed'}: {binding}"
        )
