"""Stop when done: a study stops by itself once more trials are unlikely to beat its best feasible
trial (issue 26, item 4). `--trials` stays the upper bound.

The rule, a patience rule on the best feasible objective (J/request, the first objective of the
front samplers too):

    Go through the finished trials in the order they finished. A trial *gains* when it is feasible
    and its J/request is at least `min_gain` (relative) below the value of the last trial that
    gained; the first feasible trial gains. The study stops when the last `flat_trials` finished
    trials, or more, brought no gain, once it holds at least `min_trials` finished trials (by
    default 2 x `flat_trials`: the flat stretch is at most the second half of the study).

Every finished trial counts, whatever its state (complete, a duplicate answered from an earlier
measurement, pruned, failed, infeasible): each is a configuration the sampler proposed and that
did not beat the best. A study with no feasible trial never stops by this rule: there is nothing to
beat yet. Gains below `min_gain` are measurement noise as far as this rule goes (the best feasible
trial is still the lowest value), but they add up: the gain is measured against the last trial
that gained, not against the running best.

Optuna's own `optuna.terminator` is not used: it is deprecated (4.9, to be removed in 6.0), reads
every complete trial's value whatever its constraints (a trial that fails the recovery gate often
uses the least energy), and its default regret bound needs cross-validation scores this study has
not got.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.summaries import EARLY_STOP, finished_trials, is_infeasible

# (trial number, its J/request if it is a feasible complete trial, else None), in finishing order.
History = Sequence[tuple[int, "float | None"]]


@dataclass(frozen=True)
class StopRule:
    flat_trials: int = 15  # finished trials in a row without a gain that stop the study
    min_gain: float = 0.01  # the relative improvement of the best feasible J/request that counts as a gain
    min_trials: int | None = None  # never stop before this many finished trials; None: 2 x flat_trials

    def __post_init__(self) -> None:
        if self.flat_trials < 1:
            raise ValueError(f"the stop rule needs at least 1 flat trial, got {self.flat_trials}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"the stop rule's minimum gain is a fraction in [0, 1), got {self.min_gain}")

    @property
    def judged_after(self) -> int:
        return 2 * self.flat_trials if self.min_trials is None else self.min_trials

    def describe(self) -> str:
        return (f"stop after {self.flat_trials} finished trials in a row without lowering the best feasible "
                f"J/request by >= {self.min_gain * 100:g}%, not before {self.judged_after} finished trials")


@dataclass(frozen=True)
class Standing:
    """Where a history stands against the rule."""
    finished: int
    best_trial: int | None  # the lowest feasible J/request's trial
    best_value: float | None
    last_gain_trial: int | None  # the last trial that gained
    flat: int  # finished trials since the last gain (all of them when none gained)


def standing(history: History, min_gain: float) -> Standing:
    best_trial = best_value = gain_trial = anchor = None
    flat = 0
    for number, value in history:
        flat += 1
        if value is None:
            continue
        if best_value is None or value < best_value:
            best_trial, best_value = number, value
        if anchor is None or value < anchor - min_gain * abs(anchor):
            gain_trial, anchor, flat = number, value, 0
    return Standing(len(history), best_trial, best_value, gain_trial, flat)


def stop_reason(history: History, rule: StopRule) -> str | None:
    """One line saying why the study should stop now, or None when it should go on."""
    now = standing(history, rule.min_gain)
    if now.best_trial is None or now.finished < rule.judged_after or now.flat < rule.flat_trials:
        return None
    return (f"the last {now.flat} of {now.finished} finished trials lowered the best feasible J/request by less "
            f"than {rule.min_gain * 100:g}% (best: trial {now.best_trial}, {now.best_value:.6g} J/request; "
            f"last gain: trial {now.last_gain_trial}), so more trials are unlikely to beat it")


# --- the study ------------------------------------------------------------------------------------


def feasible_value(trial: FrozenTrial) -> float | None:
    """A finished trial's J/request when it is a feasible complete trial (a duplicate carries the value
    it repeated), else None."""
    if trial.state != TrialState.COMPLETE or is_infeasible(trial) or not trial.user_attrs.get("feasible"):
        return None
    return trial.values[0]


def history(study: optuna.Study) -> list[tuple[int, float | None]]:
    """The study's finished trials (those that count towards --trials) in the order they finished."""
    latest = datetime.datetime.max
    done = sorted(finished_trials(study), key=lambda t: (t.datetime_complete or latest, t.number))
    return [(t.number, feasible_value(t)) for t in done]


def check(study: optuna.Study, rule: StopRule) -> str | None:
    return stop_reason(history(study), rule)


def record(study: optuna.Study, reason: str, rule: StopRule) -> None:
    """The stop goes with the study (search status, the bill, its MLflow run) until a trial starts."""
    study.set_user_attr(EARLY_STOP, {"reason": reason, "finished": len(finished_trials(study)),
                                     "rule": asdict(rule)})


def forget(study: optuna.Study) -> None:
    """A trial starts: the study no longer stands stopped (a resume that goes on past the rule)."""
    if study.user_attrs.get(EARLY_STOP):
        study.set_user_attr(EARLY_STOP, None)
