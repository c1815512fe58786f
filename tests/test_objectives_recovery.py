import numpy as np
import pytest

from objectives.recovery import (
    BaselineZeroError,
    Gate,
    GateOutcome,
    RecoveryEstimate,
    bootstrap_interval,
    estimate_recovery,
    per_task_recovery,
    recovery,
)


def test_recovery_ratio():
    assert recovery(0.4, 0.5) == pytest.approx(0.8)
    assert recovery(0.6, 0.5) == pytest.approx(1.2)  # a trial may beat the baseline


def test_recovery_baseline_zero_names_task():
    with pytest.raises(BaselineZeroError, match="docvqa") as info:
        recovery(0.1, 0.0, task="docvqa")
    assert isinstance(info.value, ValueError)
    assert info.value.task == "docvqa"


def test_per_task_recovery():
    assert per_task_recovery({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.6}) == pytest.approx(
        {"a": 0.5, "b": 0.5}
    )
    with pytest.raises(ValueError, match="'c'"):
        per_task_recovery({"a": 0.5, "c": 0.1}, {"a": 1.0})
    with pytest.raises(BaselineZeroError, match="'b'"):
        per_task_recovery({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.0})


def test_bootstrap_identical_scores_give_exact_one():
    scores = [1, 0, 1, 1, 0.5, 0]
    assert bootstrap_interval(scores, scores) == (1.0, 1.0)


def test_bootstrap_matches_binomial_interval():
    # Baseline solves all 100 items, trial 80 of them: the ratio is a proportion, whose 95%
    # interval is about 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 100) = (0.72, 0.88).
    baseline = np.ones(100)
    trial = np.array([1.0] * 80 + [0.0] * 20)
    low, high = bootstrap_interval(trial, baseline, n_resamples=2000, seed=1)
    assert 0.70 <= low <= 0.74
    assert 0.86 <= high <= 0.90


def test_bootstrap_is_seeded_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    baseline = rng.random(400).round()
    trial = baseline * (rng.random(400) < 0.85)
    assert bootstrap_interval(trial, baseline, seed=3) == bootstrap_interval(trial, baseline, seed=3)
    assert bootstrap_interval(trial, baseline, seed=3) != bootstrap_interval(trial, baseline, seed=4)
    low_small, high_small = bootstrap_interval(trial[:40], baseline[:40])
    low_big, high_big = bootstrap_interval(trial, baseline)
    assert high_big - low_big < high_small - low_small
    est = estimate_recovery(trial, baseline, task="t")
    assert est.point == pytest.approx(trial.mean() / baseline.mean())
    assert est.low < est.point < est.high


def test_bootstrap_errors():
    with pytest.raises(BaselineZeroError, match="scenes"):
        bootstrap_interval([1, 0], [0, 0], task="scenes")
    with pytest.raises(ValueError, match="paired"):
        bootstrap_interval([1, 0, 1], [1, 1])
    with pytest.raises(ValueError, match="no item"):
        bootstrap_interval([], [])


# Point estimates pass 0.8 on average; lower bounds do not.
ESTIMATES = {
    "docs": RecoveryEstimate(point=0.85, low=0.75, high=0.95),
    "scenes": RecoveryEstimate(point=0.90, low=0.82, high=0.98),
}


def test_point_and_lower_gates_differ():
    point = Gate(threshold=0.8, use="point").evaluate(ESTIMATES)
    lower = Gate(threshold=0.8, use="lower").evaluate(ESTIMATES)
    assert point.passed and point.margin == pytest.approx(0.075)
    assert not lower.passed and lower.margin == pytest.approx(-0.015)
    assert "lower" in lower.reason and "failed" in lower.reason
    assert isinstance(point, GateOutcome)


def test_per_task_min_binds():
    outcome = Gate(threshold=0.8, per_task_min=0.8).evaluate(ESTIMATES)
    assert outcome.passed and outcome.margin == pytest.approx(0.05) and "'docs'" in outcome.reason
    outcome = Gate(threshold=0.8, per_task_min=0.88).evaluate(ESTIMATES)
    assert not outcome.passed and outcome.margin == pytest.approx(-0.03) and "'docs'" in outcome.reason
    # Margin at exactly 0 is feasible (Optuna: constraint -margin <= 0).
    assert Gate(threshold=0.875).evaluate(ESTIMATES).passed


def test_gate_rejects_bad_input():
    with pytest.raises(ValueError, match="use"):
        Gate(use="mean")
    with pytest.raises(ValueError):
        Gate().evaluate({})


def test_only_a_gate_above_zero_can_prune_a_trial_on_a_partial_score():
    """trial.run skips the quality screen under a gate of 0: no partial score could prune there."""
    from objectives.recovery import Gate

    assert Gate(threshold=0.8).can_prune and not Gate(threshold=0.0).can_prune
    assert not Gate(threshold=0.0, per_task_min=0.5).can_prune  # the screen checks the mean only
