"""Stop when done (search/stopping.py): the rule as a pure function of a history, then in the study
loop with a stand-in objective (no compression, no server)."""

import optuna
import pytest
from optuna.trial import TrialState

from search import bill
from search import study as study_mod
from search.stopping import StopRule, history, standing, stop_reason
from search.summaries import EARLY_STOP, study_bill

RULE = StopRule(flat_trials=5, min_gain=0.01)  # judged from 10 finished trials on


def numbered(values):
    return list(enumerate(values))


def test_the_rule_fires_on_a_flat_history():
    flat = numbered([5.0, 4.0, *[4.0] * 9])  # the best came at trial 1; 9 trials since brought nothing
    reason = stop_reason(flat, RULE)
    assert reason is not None
    assert reason.startswith("the last 9 of 11 finished trials lowered the best feasible J/request by less than 1%")
    assert "best: trial 1, 4 J/request" in reason and "\n" not in reason


def test_the_rule_does_not_fire_on_an_improving_history():
    improving = numbered([5.0 - 0.2 * i for i in range(20)])  # every trial 4% or more below the last
    assert stop_reason(improving, RULE) is None
    # Gains now and then are enough: here one in every 4 trials (the rule waits for 5 flat ones).
    sparse = numbered([10.0 - (i // 4) for i in range(24)])
    assert stop_reason(sparse, RULE) is None
    then = [(24, None), (25, 14.0)]  # the last gain was trial 20's: 3 flat trials, then 2 more make 5
    assert stop_reason(sparse + then[:1], RULE) is None and stop_reason(sparse + then, RULE) is not None


def test_gains_below_the_threshold_are_noise_but_add_up():
    creeping = numbered([1.0, *[1.0 - 0.004 * i for i in range(1, 12)]])  # 0.4% a trial: 1% every 3rd
    assert stop_reason(creeping, RULE) is None
    noisy = numbered([1.0, 0.999, 1.001, 0.998, 1.002, 0.997, 1.0, 0.9985, 0.9995, 1.0, 0.999])
    now = standing(noisy, RULE.min_gain)
    assert (now.best_trial, now.last_gain_trial, now.flat) == (5, 0, 10)  # 0.3% below trial 0: noise
    assert stop_reason(noisy, StopRule(flat_trials=6, min_trials=10)) is not None
    any_drop = StopRule(flat_trials=6, min_gain=0.0, min_trials=10)  # every new best counts: the last came at trial 5
    assert standing(noisy, any_drop.min_gain).last_gain_trial == 5 and stop_reason(noisy, any_drop) is None


def test_the_rule_waits_for_a_feasible_trial_and_for_its_minimum():
    assert stop_reason(numbered([None] * 40), RULE) is None  # nothing to beat yet
    late = numbered([None] * 30 + [3.0] + [None] * 4)
    assert stop_reason(late, RULE) is None and stop_reason(late + [(35, None)], RULE) is not None
    early = numbered([2.0] + [2.5] * 7)  # 7 flat trials, but only 8 finished of the 10 it waits for
    assert stop_reason(early, RULE) is None
    assert stop_reason(early, StopRule(flat_trials=5, min_trials=6)) is not None
    with pytest.raises(ValueError):
        StopRule(flat_trials=0)
    with pytest.raises(ValueError):
        StopRule(min_gain=1.5)


def feasible_trial(value, **attrs):
    return optuna.trial.create_trial(value=value, user_attrs={"feasible": True, **attrs})


def test_the_studys_history_holds_feasible_values_only_in_finishing_order():
    study = optuna.create_study()
    study.add_trial(feasible_trial(2.0))
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"feasible": False}))  # fails the gate
    study.add_trial(optuna.trial.create_trial(value=float("inf"), user_attrs={"infeasible": True}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"interrupted": True}))
    study.add_trial(feasible_trial(1.5, retry_of=4))
    study.enqueue_trial({})  # waiting: not finished
    assert history(study) == [(0, 2.0), (1, None), (2, None), (3, None), (5, 1.5)]  # 4 was retried by 5


def flat_objective(trial):
    """Feasible, and never better than the first trial."""
    trial.set_user_attr("feasible", True)
    return 1.0 if trial.number == 0 else 1.0 + trial.suggest_float("x", 0.0, 1.0)


def test_the_study_stops_itself_says_why_and_keeps_the_reason_in_its_bill():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    options = study_mod.RunOptions(50, None, "none", {}, stop_rule=RULE, poll_s=0.01)
    reason = study_mod.optimize_until(study, flat_objective, options)
    assert reason is not None and len(study.trials) == 10  # 9 flat trials after trial 0, judged at 10
    assert study.user_attrs[EARLY_STOP]["reason"] == reason and study.user_attrs[EARLY_STOP]["finished"] == 10
    paid = study_bill(study)
    assert paid.stopped == reason
    assert f"  stopped early: {reason}" in bill.describe(paid)
    assert bill.as_dict(paid)["stopped_early"] == reason
    assert bill.mlflow_fields(paid)[1]["bill_stopped_early"] == reason

    # Resumed without the rule, the study goes on to --trials and no longer stands stopped.
    study_mod.optimize_until(study, flat_objective, study_mod.RunOptions(12, None, "none", {}, poll_s=0.01))
    assert len(study.trials) == 12 and study.user_attrs[EARLY_STOP] is None and study_bill(study).stopped is None


def test_trials_the_study_queued_run_before_it_stops_and_trials_stays_the_upper_bound():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.add_trial(feasible_trial(1.0))
    for _ in range(12):
        study.add_trial(feasible_trial(1.5))  # flat: the rule fires from here on
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x}, user_attrs={"preset": f"p{x}"})
    reason = study_mod.optimize_until(study, flat_objective,
                                      study_mod.RunOptions(30, None, "none", {}, stop_rule=RULE, poll_s=0.01))
    assert reason is not None and [t.state for t in study.trials].count(TrialState.COMPLETE) == 16
    assert all(t.user_attrs.get("preset") for t in study.trials[13:])  # the queued presets ran, then it stopped

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    improving = study_mod.RunOptions(8, None, "none", {}, stop_rule=StopRule(flat_trials=2, min_trials=1), poll_s=0.01)
    def better_each_time(trial):
        trial.set_user_attr("feasible", True)
        return 10.0 - trial.number - trial.suggest_float("x", 0, 0.5)
    assert study_mod.optimize_until(study, better_each_time, improving) is None
    assert len(study.trials) == 8  # improving all along: --trials ends it, as before
