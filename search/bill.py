"""The search's own bill (pure functions): the seconds and joules its stages spent, and after how
many requests the configuration it found repays them.

Every trial records each stage's seconds as `time_<stage>_s` and its joules as `spent_<stage>_j`
(search/trial.py), failed and pruned ones too: the search paid for them. The baseline's stages are
recorded the same way. The break-even point is

    search joules / (reference J/request - best feasible J/request)

requests of the measured workload: the reference's J/request is that of the trials that ran the
reference configuration (the study's first trial is one), priced as every trial is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The stages in the order a trial runs them, with the name the bill gives their sum.
STAGES = {"check": "checks", "compress": "compression", "serve": "server starts", "warmup": "warm-ups",
          "screen": "quality screens", "workload": "measured windows", "quality": "quality scoring"}
_STAGE_METRIC = re.compile(r"^(?:time_(?P<timed>\w+)_s|spent_(?P<metered>\w+)_j)$")
_REPEAT = re.compile(r"^repeat_\d+$")  # a repeated measured window (workload.energy_repeats)
ESTIMATE_NOTE = "an ESTIMATE from CPU time x an assumed W per busy core, not a measurement"


@dataclass(frozen=True)
class TrialCost:
    number: int
    spent: Mapping[str, float]  # the trial's time_<stage>_s and spent_<stage>_j
    config: Mapping[str, Any] | None = None
    j_per_request: float | None = None  # a completed trial's measured objective


@dataclass
class Spend:
    seconds: float = 0.0
    joules: float = 0.0


@dataclass
class Bill:
    stages: dict[str, Spend]  # stage -> what the trials spent on it
    baseline: Spend | None  # None: the baseline was made before its stages were metered
    total: Spend
    unmetered_trials: int  # trials whose stages have seconds but no joules (made before metering)
    energy_source: str | None
    reference_j_per_request: float | None
    reference_from: str
    best_trial: int | None
    best_j_per_request: float | None
    break_even_requests: int | None  # None: never, or unknown (`break_even` says which)
    break_even: str
    stopped: str | None = None  # why the study stopped before --trials (search/stopping.py); None: it did not


def stage_of(metric: str) -> tuple[str, str] | None:
    """(stage, 'seconds' or 'joules') of a stage metric; None for any other metric."""
    match = _STAGE_METRIC.match(metric)
    if match is None:
        return None
    name = match["timed"] or match["metered"]
    return ("workload" if _REPEAT.match(name) else name), ("seconds" if match["timed"] else "joules")


def add_spent(into: dict[str, Spend], spent: Mapping[str, float]) -> bool:
    """Add one run's stage metrics to the sums by stage; False when its stages have seconds but no
    joules (a trial made before the stages were metered)."""
    timed = metered = False
    for metric, value in spent.items():
        kind = stage_of(metric)
        if kind is None:
            continue
        stage, unit = kind
        total = into.setdefault(stage, Spend())
        if unit == "seconds":
            total.seconds += value
            timed = True
        else:
            total.joules += value
            metered = True
    return metered or not timed


def requests_to_break_even(search_j: float, reference_j_per_request: float, best_j_per_request: float
                           ) -> int | None:
    """Requests of the measured workload after which the saving per request repays `search_j`;
    None when the best configuration saves nothing."""
    saving = reference_j_per_request - best_j_per_request
    if saving <= 0:
        return None
    return math.ceil(search_j / saving)


def _same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal as the storage gives them back (lists, not tuples)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def reference_energy(baseline: Mapping[str, Any], trials: Sequence[TrialCost]) -> tuple[float | None, str]:
    """The reference's J/request and where it comes from: the completed trials that ran the reference
    configuration (the study's first trial is one), their mean when the study measured it again. The
    reference is priced exactly as the configurations it is compared with: same stages, same window."""
    reference = baseline.get("reference")
    ran_it = sorted((t for t in trials if reference is not None and t.j_per_request is not None
                     and t.config is not None and _same_config(t.config, reference)), key=lambda t: t.number)
    if not ran_it:
        return None, "none: no completed trial ran the reference configuration yet"
    mean = sum(t.j_per_request for t in ran_it) / len(ran_it)
    numbers = ", ".join(str(t.number) for t in ran_it)
    return mean, (f"trial {numbers}, which ran the reference configuration" if len(ran_it) == 1
                  else f"the mean of trials {numbers}, which ran the reference configuration")


def make_bill(trials: Sequence[TrialCost], baseline: Mapping[str, Any], best: TrialCost | None,
              energy_source: str | None) -> Bill:
    """The bill of finished trials (every state) and the baseline; `best` is the best feasible trial."""
    stages: dict[str, Spend] = {}
    unmetered = sum(not add_spent(stages, t.spent) for t in trials)
    baseline_spend = None
    if baseline.get("spent"):
        by_stage: dict[str, Spend] = {}
        add_spent(by_stage, baseline["spent"])
        baseline_spend = Spend(sum(s.seconds for s in by_stage.values()), sum(s.joules for s in by_stage.values()))
    spends = [*stages.values(), *([baseline_spend] if baseline_spend else [])]
    total = Spend(sum(s.seconds for s in spends), sum(s.joules for s in spends))
    reference_j, reference_from = reference_energy(baseline, trials)
    best_j = best.j_per_request if best is not None else None
    requests = None
    if reference_j is None:
        note = "unknown: no reference J/request"
    elif best_j is None:
        note = "never: no feasible configuration yet"
    else:
        requests = requests_to_break_even(total.joules, reference_j, best_j)
        note = (f"after {requests} requests of the measured workload" if requests is not None
                else "never: the best feasible configuration saves nothing over the reference")
    ordered = {name: stages[name] for name in [*STAGES, *sorted(set(stages) - set(STAGES))] if name in stages}
    return Bill(ordered, baseline_spend, total, unmetered, energy_source, reference_j, reference_from,
                best.number if best is not None else None, best_j, requests, note)


def describe(bill: Bill) -> list[str]:
    """The bill as `search status` prints it."""
    source = ESTIMATE_NOTE if bill.energy_source == "estimate" else bill.energy_source or "unknown meter"
    lines = [f"what the search spent (energy: {source}):"]
    rows = [(STAGES.get(name, name), spend) for name, spend in bill.stages.items()]
    for label, spend in [*rows, ("baseline", bill.baseline), ("total", bill.total)]:
        lines.append(f"  {label:<17} " + (f"{spend.seconds:10.1f} s {spend.joules:12.1f} J" if spend
                                          else "not metered (made before the search metered its stages)"))
    if bill.unmetered_trials:
        lines.append(f"  ({bill.unmetered_trials} trials made before stage metering: their joules are not in "
                     "the total)")
    reference = f"{bill.reference_j_per_request:.6g} J/request" if bill.reference_j_per_request is not None else "none"
    best = (f"{bill.best_j_per_request:.6g} J/request (trial {bill.best_trial})" if bill.best_trial is not None
            else "none yet")
    lines.append(f"  reference {reference} ({bill.reference_from}); best feasible {best}")
    lines.append(f"  break-even: {bill.break_even}")
    if bill.stopped:
        lines.append(f"  stopped early: {bill.stopped}")
    return lines


def as_dict(bill: Bill) -> dict[str, Any]:
    def spend(s: Spend | None) -> dict[str, float] | None:
        return None if s is None else {"seconds": s.seconds, "joules": s.joules}
    return {"energy_source": bill.energy_source, "estimate": bill.energy_source == "estimate",
            "stages": {name: spend(s) for name, s in bill.stages.items()}, "baseline": spend(bill.baseline),
            "total": spend(bill.total), "unmetered_trials": bill.unmetered_trials,
            "reference_j_per_request": bill.reference_j_per_request, "reference_from": bill.reference_from,
            "best_trial": bill.best_trial, "best_j_per_request": bill.best_j_per_request,
            "break_even_requests": bill.break_even_requests, "break_even": bill.break_even,
            "stopped_early": bill.stopped}


def mlflow_fields(bill: Bill) -> tuple[dict[str, float], dict[str, str]]:
    """The bill as the study's parent run holds it: numbers as metrics, the sentences as tags."""
    metrics = {"bill_total_s": bill.total.seconds, "bill_total_j": bill.total.joules}
    for name, spend in [*bill.stages.items(), *([("baseline", bill.baseline)] if bill.baseline else [])]:
        metrics.update({f"bill_{name}_s": spend.seconds, f"bill_{name}_j": spend.joules})
    optional = {"bill_reference_j_per_request": bill.reference_j_per_request,
                "bill_best_j_per_request": bill.best_j_per_request,
                "bill_break_even_requests": bill.break_even_requests}
    metrics.update({k: float(v) for k, v in optional.items() if v is not None})
    tags = {"bill_energy_source": bill.energy_source or "unknown", "bill_reference": bill.reference_from,
            "bill_break_even": bill.break_even, "bill_unmetered_trials": str(bill.unmetered_trials)}
    if bill.stopped:
        tags["bill_stopped_early"] = bill.stopped
    return metrics, tags
