"""What a study's MLflow experiment says at a glance (pure functions, no MLflow import).

MLflow 3.17's runs table shows, until a user picks more, the columns Run Name, Created, Dataset,
Duration, Source and Models, and the experiment's description above it. So the answer goes there:

- each trial's run name says its state (complete, pruned and why, infeasible, failed, a repeat),
  its J/request with the energy source, its recovery against the gate, and the settings that differ
  from the reference: `trial_view`, from the record the trial logs (a spooled record sent later
  gives the same view);
- the study's parent run and the experiment's description name the best feasible trial, its
  saving over the reference and the search's break-even, with a link to the trials sorted by
  energy per request, and the parent run holds that table (`study_view`).

A trial is described by a `Row` made either from its MLflow record or from its Optuna trial, so that
the run's name and the parent's table say the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote

OBJECTIVE = "energy_j_per_request"
MAX_NAME = 240  # MLflow keeps longer run names, but a name is read in one table cell
# The experiment's runs, sorted by energy per request (trials without one, not measured, come last).
SORTED_VIEW = "#/experiments/{experiment_id}/runs?orderByKey=" + quote("metrics.`energy_j_per_request`") + \
    "&orderByAsc=true"
# MLflow's shared view (its "Share" button): an experiment tag `mlflow.sharedViewState.KEY` holding the
# runs table's sort, columns and widths, opened by `?viewStateShareKey=KEY`. This one shows the answer's
# columns where the default view has Source, Models and Dataset (empty for a study), and wider run names.
VIEW_KEY = "answer"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
ANSWER_VIEW = "#/experiments/{experiment_id}/runs?viewStateShareKey=" + VIEW_KEY
ANSWER_COLUMNS = ["tags.`verdict`", "metrics.`energy_j_per_request`", "tags.`energy_source`",
                  "metrics.`energy_vs_reference`", "metrics.`recovery_mean`", "metrics.`gate_threshold`",
                  "tags.`settings_vs_reference`"]


def answer_view() -> dict[str, Any]:
    """The shared view's state: the trials sorted by energy per request, the answer's columns shown."""
    return {"orderByKey": "metrics.`energy_j_per_request`", "orderByAsc": True, "searchFilter": "",
            "selectedColumns": ANSWER_COLUMNS, "columnWidths": {"attributes.`Run Name`": 420}}
VERDICTS = {"pass": "PASS", "gate": "BELOW GATE", "slo": "MISSES SLO", "repeat": "REPEAT", "PRUNED": "PRUNED",
            "INFEASIBLE": "INFEASIBLE", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "WAITING"}
# A trial run's metrics in the order its page lists them: the answer first, then the rest as logged.
KEY_METRICS = ("energy_j_per_request", "energy_vs_reference", "recovery_mean", "recovery_margin", "gate_threshold",
               "energy_net_j", "tokens_per_wh", "trial_s")
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "INFEASIBLE": "KILLED"}  # else FAILED


@dataclass
class Row:
    number: int
    state: str  # COMPLETE, PRUNED, INFEASIBLE, FAIL (RUNNING, WAITING for a study still going)
    energy: float | None = None  # J/request, measured by this trial
    source: str | None = None  # energy_source: nvml, rapl, estimate
    recovery: float | None = None
    margin: float | None = None  # recovery margin against the gate (>= 0 passes)
    feasible: bool = False
    gate: float | None = None
    reason: str = ""
    duplicate_of: int | None = None
    # setting -> (this trial's, reference's); None: no configuration recorded (it failed before sampling)
    changed: dict[str, tuple[Any, Any]] | None = field(default_factory=dict)
    reference_j: float | None = None  # the reference's J/request, where known

    @property
    def verdict(self) -> str:
        if self.state != "COMPLETE":
            return self.state
        if self.duplicate_of is not None:
            return "repeat"
        if self.feasible:
            return "pass"
        return "gate" if self.margin is None or self.margin < 0 else "slo"

    @property
    def vs_reference(self) -> float | None:
        if self.energy is None or not self.reference_j:
            return None
        return self.energy / self.reference_j


def changed_settings(config: Mapping[str, Any] | None, reference: Mapping[str, Any] | None
                     ) -> dict[str, tuple[Any, Any]] | None:
    """The trial's settings that differ from the reference configuration's; None when either is unknown."""
    if not config or not reference:
        return None
    missing = object()
    return {k: (v, reference.get(k)) for k, v in sorted(config.items()) if reference.get(k, missing) != v}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def row_from_record(record: Mapping[str, Any]) -> Row:
    """A trial as its MLflow record (search/study.py's Objective) describes it."""
    tags, metrics = record.get("tags", {}), record.get("metrics", {})
    duplicate = tags.get("duplicate_of")
    return Row(number=int(record["number"]), state=tags.get("state", "COMPLETE"),
               energy=_finite(metrics.get(OBJECTIVE)), source=tags.get("energy_source"),
               recovery=_finite(metrics.get("recovery_mean")), margin=_finite(metrics.get("recovery_margin")),
               feasible=tags.get("feasible") == "true", gate=_finite(record.get("gate")),
               reason=tags.get("failure_reason", ""), duplicate_of=None if duplicate is None else int(duplicate),
               changed=changed_settings(record.get("params"), record.get("reference")),
               reference_j=_finite(record.get("reference_j")) or (
                   _finite(metrics.get(OBJECTIVE)) if record.get("is_reference") else None))


def row_from_trial(trial: Any, gate: float | None, reference: Mapping[str, Any] | None,
                   reference_j: float | None) -> Row:
    """A trial as the Optuna study holds it (an optuna FrozenTrial)."""
    attrs = trial.user_attrs
    metrics = attrs.get("metrics") or {}
    state = "INFEASIBLE" if attrs.get("infeasible") else trial.state.name
    duplicate = attrs.get("duplicate_of")
    measured = state == "COMPLETE" and duplicate is None and trial.values
    return Row(number=trial.number, state=state, energy=_finite(trial.values[0]) if measured else None,
               source=attrs.get("energy_source"), recovery=_finite(metrics.get("recovery_mean")),
               margin=_finite(metrics.get("recovery_margin")), feasible=bool(attrs.get("feasible")), gate=gate,
               reason=attrs.get("reason", ""), duplicate_of=duplicate,
               changed=changed_settings(attrs.get("config"), reference), reference_j=reference_j)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def settings_line(row: Row, limit: int | None = None) -> str:
    """The settings that differ from the reference, `name=value`, by their last name part."""
    if row.changed is None:
        return "settings not recorded"
    if not row.changed:
        return "the reference's settings"
    items = [f"{_short(k)}={v}" for k, (v, _) in row.changed.items()]
    if limit is not None and len(items) > limit:
        items = items[:limit] + [f"+{len(items) - limit} more"]
    return ", ".join(items)


def _reason(row: Row) -> str:
    text = row.reason
    for prefix in ("pruned: ", "infeasible: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return " ".join(text.split())


def energy_text(row: Row) -> str:
    return f"{row.energy:.4g} J/request ({row.source or 'unknown meter'})"


def recovery_text(row: Row) -> str:
    if row.recovery is None:
        return "recovery not scored"
    if row.gate is None:
        return f"recovery {row.recovery:.3f}"
    return f"recovery {row.recovery:.3f} {'>=' if row.recovery >= row.gate else '<'} gate {row.gate:g}"


def run_name(row: Row) -> str:
    """What the runs table's Run Name column says of a trial."""
    head = f"trial-{row.number:03d} {VERDICTS.get(row.verdict, row.verdict)}"
    if row.verdict == "repeat":
        text = f"{head} of trial-{row.duplicate_of:03d} (measured there, not served again) | {settings_line(row, 4)}"
    elif row.state == "COMPLETE" and row.energy is not None:
        ratio = f" = {row.vs_reference:.2f}x ref" if row.vs_reference is not None else ""
        text = f"{head} {energy_text(row)}{ratio}, {recovery_text(row)} | {settings_line(row, 4)}"
    else:
        text = f"{head}: {_reason(row) or 'no reason recorded'} | {settings_line(row, 4)}"
    return text if len(text) <= MAX_NAME else text[:MAX_NAME - 3] + "..."


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def trial_note(row: Row, energy_method: str | None = None) -> str:
    """The trial run's description (markdown, tag mlflow.note.content): the answer first."""
    verdict = VERDICTS.get(row.verdict, row.verdict)
    lines = [f"**trial {row.number}: {verdict}**", ""]
    if row.verdict == "repeat":
        lines.append(f"The configuration of trial {row.duplicate_of}, measured there: not served again "
                     "(`--repeat-measured` serves it).")
    elif row.state == "COMPLETE" and row.energy is not None:
        ratio = f", {row.vs_reference:.3f}x the reference's {row.reference_j:.4g}" if row.vs_reference else ""
        lines.append(f"- energy: {energy_text(row)}{ratio}" + (f"; {energy_method}" if energy_method else ""))
        margin = f" (margin {row.margin:+.3f})" if row.margin is not None else ""
        lines.append(f"- {recovery_text(row)}{margin}")
    else:
        lines.append(f"- why: {row.reason or 'no reason recorded'}")
    lines.append("")
    if row.changed is None:
        lines.append("No configuration recorded.")
    elif row.changed:
        lines.append("Settings that differ from the reference:")
        lines.append("")
        lines.append(_table([[k, str(v), str(r)] for k, (v, r) in row.changed.items()],
                            ["setting", "this trial", "reference"]))
    else:
        lines.append("The reference configuration's own settings.")
    return "\n".join(lines)


def trial_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial's run shows: its name, description, the tags and metrics that say the answer, and
    the MLflow status of its state."""
    row = row_from_record(record)
    tags = {"verdict": VERDICTS.get(row.verdict, row.verdict), "settings_vs_reference": settings_line(row),
            "mlflow.note.content": trial_note(row, record.get("tags", {}).get("energy_method"))}
    if row.recovery is not None and row.gate is not None:
        tags["recovery_vs_gate"] = recovery_text(row)
    metrics = {}
    if row.vs_reference is not None:
        metrics["energy_vs_reference"] = row.vs_reference
    if row.gate is not None:
        metrics["gate_threshold"] = row.gate
    return {"name": run_name(row), "tags": tags, "metrics": metrics,
            "status": MLFLOW_STATUS.get(row.state, "FAILED")}


def sort_key(row: Row) -> tuple:
    """Feasible trials by energy, then the other measured ones by energy, then the rest by number."""
    if row.energy is None:
        return (2, 0.0, row.number)
    return (0 if row.feasible else 1, row.energy, row.number)


def table(rows: list[Row]) -> dict[str, list]:
    """Every trial, sorted by `sort_key`, as columns (MLflow's log_table takes a dict of lists)."""
    ordered = sorted(rows, key=sort_key)
    return {"trial": [r.number for r in ordered],
            "verdict": [VERDICTS.get(r.verdict, r.verdict) for r in ordered],
            "energy_j_per_request": [r.energy for r in ordered],
            "energy_source": [r.source for r in ordered],
            "vs_reference": [r.vs_reference for r in ordered],
            "recovery_mean": [r.recovery for r in ordered],
            "gate": [r.gate for r in ordered],
            "settings_vs_reference": [settings_line(r) for r in ordered],
            "reason": [_reason(r) if r.state != "COMPLETE" else "" for r in ordered]}


def study_view(name: str, rows: list[Row], best: Row | None, counts: Mapping[str, int], break_even: str,
               job: str | None, top: int = 10) -> dict[str, Any]:
    """What the study's parent run and its experiment say: the best feasible trial, its saving and
    the break-even, the trials sorted by energy. `{experiment_id}` in the notes is the tracker's."""
    link = (f"[every trial sorted by energy per request, with its verdict, energy, recovery and settings]"
            f"({ANSWER_VIEW}) (or [sorted, default columns]({SORTED_VIEW}))")
    states = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    if best is None:
        headline = f"study {name}: no feasible trial yet"
        answer = f"**No feasible trial yet** ({states})."
        tags: dict[str, str] = {"best_trial": "none"}
        metrics: dict[str, float] = {}
    else:
        saving = None if best.vs_reference is None else 1.0 - best.vs_reference
        saving_text = "" if saving is None else (
            f", {abs(saving):.1%} {'less' if saving >= 0 else 'more'} energy than the reference's "
            f"{best.reference_j:.4g} J/request")
        headline = (f"study {name}: best trial-{best.number:03d} {energy_text(best)}"
                    + (" (the reference configuration)" if best.changed == {} else
                       "" if saving is None else f" ({-saving:+.1%} energy vs reference)"))
        answer = (f"**Best feasible: trial {best.number}**, {energy_text(best)}{saving_text}; "
                  f"{recovery_text(best)}. Settings that differ from the reference: {settings_line(best)}. "
                  f"Break-even of the search: {break_even}.")
        if best.changed == {}:  # the reference configuration itself: nothing searched beat it
            answer += " The best feasible trial ran the reference configuration: no configuration searched so " \
                      "far uses less energy per request."
        tags = {"best_trial": str(best.number), "best_settings": settings_line(best),
                "best_energy": energy_text(best), "break_even": break_even}
        metrics = {"best_j_per_request": best.energy}
        if saving is not None:
            metrics["best_saving_vs_reference"] = saving
    ordered = sorted(rows, key=sort_key)
    shown = [[f"trial-{r.number:03d}", VERDICTS.get(r.verdict, r.verdict),
              "" if r.energy is None else f"{r.energy:.4g}", r.source or "",
              "" if r.vs_reference is None else f"{r.vs_reference:.3f}",
              "" if r.recovery is None else f"{r.recovery:.3f}", settings_line(r, 4)] for r in ordered[:top]]
    body = "\n".join([answer, "", f"Trials: {states}. {link}." + (f" Job: {job}." if job else ""), "",
                      f"The {min(top, len(ordered))} first of {len(ordered)} trials (feasible first, by energy):", "",
                      _table(shown, ["trial", "verdict", "J/request", "source", "x reference", "recovery",
                                     "settings vs reference"])])
    tags["mlflow.note.content"] = body
    # The description above the runs table opens folded to its first lines: the view's link goes there.
    short = f"([every trial by energy]({ANSWER_VIEW}))"
    head = None if best is None else f"**Best feasible: trial {best.number}**"
    first = answer.replace(head, f"{head} {short}", 1) if head else f"{answer} {short}"
    return {"name": headline[:MAX_NAME], "tags": tags, "metrics": metrics, "table": table(rows),
            "experiment_note": f"{first}\n\n{link}; the study's run `{headline[:MAX_NAME]}` has the table, "
                               "the figures and the search's bill."}


def from_study(study: Any) -> dict[str, Any]:
    """`study_view` of an Optuna study: its finished trials, best feasible trial and bill."""
    from search.dedupe import reference_config
    from search.summaries import counts, study_bill
    made = study_bill(study)
    reference, gate = reference_config(study), study.user_attrs.get("gate_threshold")
    rows = [row_from_trial(t, gate, reference, made.reference_j_per_request)
            for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    best = next((r for r in rows if r.number == made.best_trial), None)
    return study_view(study.study_name, rows, best, counts(study), made.break_even, study.user_attrs.get("job"))
