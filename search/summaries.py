"""What a study holds, read from its trials: counts by state, the best feasible trial, progress,
the search against the presets it was given, the search's bill.

Shared by the study loop, the live progress line, the CLI and the export, so none of them imports
another for it.
"""

from __future__ import annotations

from dataclasses import replace

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.bill import Bill, TrialCost, make_bill

# The constraint an infeasible trial violates: it cannot run on this hardware and vLLM build.
RUNS_HERE = "runs_here"
# The user attribute of a trial answered from an earlier measurement of its configuration (search/dedupe.py).
DUPLICATE_OF = "duplicate_of"
# The study's user attribute that says why it stopped before --trials (search/stopping.py).
EARLY_STOP = "early_stop"
# The gate's constraint: -(recovery margin), <= 0 when the trial keeps enough of the reference's quality.
RECOVERY_GATE = "recovery_gate"
# Where a trial's constraints are stored. Optuna 5 reads this list as well as its named keys
# (`constraints:NAME`, what Trial.set_constraint writes); optuna-dashboard 0.21 reads only this list
# (its _serializer: `system_attrs.get("constraints", [])`) and showed every trial of a named-key study
# as feasible. The trial's user attribute of the same name keeps the names.
CONSTRAINTS = "constraints"


def constraint_order(names) -> list[str]:
    """The order a trial's constraints are stored in: the gate, runs_here, then the latency limits."""
    first = [n for n in (RECOVERY_GATE, RUNS_HERE) if n in names]
    return first + sorted(set(names) - set(first))


def _named_keys(trial: FrozenTrial) -> bool:
    return any(key.startswith(f"{CONSTRAINTS}:") for key in trial.system_attrs)


def set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Tell Optuna a trial's constraints (<= 0 holds), readable by its samplers and by optuna-dashboard:
    one list in `constraint_order`, the names in the trial's user attribute `constraints`. Samplers see
    the same values and count as with named keys (GP compares the names of every trial's constraints:
    a study whose trials hold named keys, made before, goes on with named keys)."""
    ordered = {name: float(values[name]) for name in constraint_order(values)}
    trial.set_user_attr(CONSTRAINTS, ordered)
    finished = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if any(_named_keys(t) for t in finished):
        for name, value in ordered.items():
            trial.set_constraint(name, value)
        return
    storage = trial.storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(trial.study.study_name), trial.number)
    storage.set_trial_system_attr(trial_id, CONSTRAINTS, list(ordered.values()))


def constraints_of(trial: FrozenTrial) -> dict[str, float]:
    """A trial's constraints by name, however they were stored (a list, or Optuna's named keys)."""
    named = trial.user_attrs.get(CONSTRAINTS)
    if isinstance(named, dict):
        return {k: float(v) for k, v in named.items()}
    return {k: v for k, v in trial.constraints.items()}


def is_infeasible(trial: FrozenTrial) -> bool:
    """Rejected before any work (this platform cannot run it): complete, with RUNS_HERE violated."""
    return bool(trial.user_attrs.get("infeasible"))


def is_duplicate(trial: FrozenTrial) -> bool:
    """Answered from an earlier trial's measurement of the same configuration: nothing was served."""
    return DUPLICATE_OF in trial.user_attrs


def measured(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials that ran: their values are measurements (a duplicate's are another trial's)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not is_infeasible(t) and not is_duplicate(t)]


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state. `feasible` is the part of `complete` that passed the recovery gate;
    `infeasible` are configurations rejected before any work (they cannot run here)."""
    out = {"complete": 0, "feasible": 0, "pruned": 0, "infeasible": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if is_infeasible(t):
            out["infeasible"] += 1
        elif t.state == TrialState.COMPLETE:
            out["complete"] += 1
            out["feasible"] += bool(t.user_attrs.get("feasible"))
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            out["failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    return out


def _feasible(study: optuna.Study) -> list[FrozenTrial]:
    """Measured trials that kept enough of the reference's quality."""
    return [t for t in measured(study) if t.user_attrs.get("feasible")]


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    return min(_feasible(study), key=lambda t: t.values[0], default=None)


# Study attribute: {preset: {param: value}} for the values a preset runs that its space never samples.
PRESETS_OUTSIDE_SPACE = "presets_outside_space"


def versus_presets(study: optuna.Study) -> dict | None:
    """What the search found against what it was given: the best feasible sampled trial beside every
    feasible enqueued preset (the reference, the seeds), cheapest first, each with the sampled trial's
    change in price against it and the preset's values no sampled trial can take; None until a feasible
    sampled trial and a feasible preset are both measured."""
    feasible = _feasible(study)
    presets = [t for t in feasible if t.user_attrs.get("preset")]
    best = min((t for t in feasible if not t.user_attrs.get("preset")), key=lambda t: t.values[0], default=None)
    if best is None or not presets:
        return None
    found = best.values[0]
    outside = study.user_attrs.get(PRESETS_OUTSIDE_SPACE, {})
    rows = [{"preset": t.user_attrs["preset"], "trial": t.number, "objective": t.values[0],
             "best_sampled_change": found / t.values[0] - 1, "outside_space": outside.get(t.user_attrs["preset"], {})}
            for t in sorted(presets, key=lambda t: t.values[0])]
    return {"best_sampled": {"trial": best.number, "objective": found}, "presets": rows}


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards --trials: complete, pruned, and failed ones that are not retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in retried)]


def finished(study: optuna.Study) -> int:
    """How many trials count towards --trials (finished_trials)."""
    return len(finished_trials(study))


def trial_cost(trial: FrozenTrial) -> TrialCost:
    """What a finished trial spent (its stage metrics) and, when it ran to the end, what it measured."""
    ran = trial.state == TrialState.COMPLETE and not is_infeasible(trial) and not is_duplicate(trial)
    spent = trial.user_attrs.get("metrics") or trial.user_attrs.get("stage_times") or {}
    return TrialCost(trial.number, spent, trial.user_attrs.get("config"), trial.values[0] if ran else None)


def study_bill(study: optuna.Study) -> Bill:
    """The search's bill: every finished trial, whatever its state, and the baseline (search/bill.py)."""
    costs = [trial_cost(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    best = best_feasible(study)
    made = make_bill(costs, study.user_attrs.get("baseline", {}), None if best is None else trial_cost(best),
                     study.user_attrs.get("definition", {}).get("energy_source"))
    stop = study.user_attrs.get(EARLY_STOP)
    return replace(made, stopped=stop["reason"]) if stop else made
