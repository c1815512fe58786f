"""An infeasible trial is recorded as the product's Objective records it (complete, value inf, the
runs_here and recovery_gate constraints violated; tests/test_e2e.py checks the recording): every sampler the product
offers then proposes the configurations that cannot run here less and less."""

import math

import optuna
import pytest

from search.study import MULTI_OBJECTIVE, make_sampler
from search.summaries import RUNS_HERE


def _study(sampler_name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    multi = sampler_name in MULTI_OBJECTIVE
    study = optuna.create_study(sampler=make_sampler(sampler_name, seed=1),
                                directions=["minimize", "maximize"] if multi else ["minimize"])

    def objective(trial):
        kv = trial.suggest_categorical("serve.kv_cache_dtype", ["fp8", "auto"])
        scheme = trial.suggest_categorical("compress.scheme", ["w4a16", "none", "fp8_dynamic", "w8a8"])
        # Every trial carries the same constraint names, as the product's Objective records them
        # (GP refuses trials whose names differ): an infeasible one violates them all.
        if kv == "fp8" or scheme == "w4a16":  # what an AVX2 CPU cannot run
            trial.set_constraint("recovery_gate", 1.0)
            trial.set_constraint(RUNS_HERE, 1.0)
            return (math.inf, -math.inf) if multi else math.inf
        trial.set_constraint("recovery_gate", -0.1)
        trial.set_constraint(RUNS_HERE, 0.0)
        energy = {"none": 3.0, "fp8_dynamic": 2.0, "w8a8": 2.5}[scheme]
        return (energy, 1.0 / energy) if multi else energy

    study.optimize(objective, n_trials=40)
    return study


# At random 5 of 8 combinations cannot run (62.5%). NSGA-II learns more slowly: its mutation
# redraws each categorical with probability 1/n_params (here 0.5) in every child.
@pytest.mark.parametrize("sampler_name, most", [("tpe", 0.35), ("gp", 0.35), ("nsga2", 0.5)])
def test_samplers_learn_to_avoid_what_cannot_run(sampler_name, most):
    trials = _study(sampler_name).trials
    cannot_run = [t.params["serve.kv_cache_dtype"] == "fp8" or t.params["compress.scheme"] == "w4a16" for t in trials]
    assert sum(cannot_run[-20:]) / 20 < most, sum(cannot_run[-20:])


def test_the_best_trial_is_never_an_infeasible_one():
    study = _study("tpe")
    assert math.isfinite(study.best_trial.value) and study.best_trial.constraints[RUNS_HERE] == 0.0
