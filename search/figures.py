"""The study's figures, as the parent MLflow run and `search export` show them: the (energy,
recovery) front, the optimisation history, the parameter importances, and the distance to the
roofline at TDP (GPU studies).

Every axis has its unit, every figure the gate it was judged by, and the energy's source where it is
an estimate; the importances name the evaluator that computed them (its class, not a label kept
beside it) and the trials they were computed over.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.export import pareto_front, points
from search.summaries import is_duplicate, is_infeasible, measured

ENERGY_AXIS = "energy per request [J]"
RECOVERY_AXIS = "mean recovery [fraction of the reference's quality]"
FEASIBLE, BELOW, FRONT, OTHER = "#1f77b4", "#bbbbbb", "#d62728", "#ff7f0e"
# Named as the user reads them; Optuna's class names otherwise.
EVALUATORS = {"PedAnovaImportanceEvaluator": "PED-ANOVA", "FanovaImportanceEvaluator": "fANOVA",
              "MeanDecreaseImpurityImportanceEvaluator": "mean decrease in impurity"}


def energy_axis(study: optuna.Study) -> str:
    sources = {t.user_attrs.get("energy_source") for t in measured(study)} - {None}
    if sources == {"estimate"}:
        return f"{ENERGY_AXIS}, an ESTIMATE (no power meter)"
    if "estimate" in sources:
        return f"{ENERGY_AXIS}, some estimated"
    return ENERGY_AXIS + (f", {', '.join(sorted(sources))}" if sources else "")


def gate_of(study: optuna.Study) -> float:
    return float(study.user_attrs.get("gate_threshold", 0.8))


def reference_energy(study: optuna.Study) -> float | None:
    from search.summaries import study_bill
    return study_bill(study).reference_j_per_request


def evaluator_label(evaluator: object) -> str:
    name = type(evaluator).__name__
    label = EVALUATORS.get(name, name)
    quantile = getattr(evaluator, "_target_quantile", None)
    return f"{label}, top {quantile:.0%} of trials" if quantile is not None else label


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def figures(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Pareto plot, optimisation history, parameter importances and the roofline distance, as PNGs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    gate = gate_of(study)
    reference = reference_energy(study)
    pts = points(study)
    if pts:
        front = {p.trial for p in pareto_front(pts) if p.feasible}
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for feasible, colour, label in ((False, BELOW, "below the gate (or an SLO)"), (True, FEASIBLE, "feasible")):
            group = [p for p in pts if p.feasible == feasible]
            ax.scatter([p.energy for p in group], [p.recovery for p in group], c=colour, label=label, s=28)
        line = sorted((p for p in pts if p.trial in front), key=lambda p: p.energy)
        ax.plot([p.energy for p in line], [p.recovery for p in line], "-o", c=FRONT, label="feasible front")
        for p in line:
            ax.annotate(f"trial {p.trial}", (p.energy, p.recovery), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.axhline(gate, ls="--", c="k", lw=0.8, label=f"gate: recovery >= {gate:g}")
        low, high = ax.get_ylim()
        ax.axhspan(min(low, gate), gate, color="#eeeeee", zorder=0)  # the region the gate refuses
        ax.set_ylim(min(low, gate - 0.02), max(high, gate + 0.02))
        if reference is not None:
            ax.axvline(reference, ls=":", c="#555555", lw=0.8, label=f"reference {reference:.4g} J")
        ax.set_xlabel(energy_axis(study))
        ax.set_ylabel(RECOVERY_AXIS)
        ax.set_title(f"{study.study_name}: energy per request vs recovery ({len(pts)} measured trials)")
        ax.legend(fontsize=8, loc="best")
        made["pareto"] = _save(fig, out_dir / "pareto.png")

    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if pts:
        done = sorted(pts, key=lambda p: p.trial)
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        ax.scatter([p.trial for p in done if p.feasible], [p.energy for p in done if p.feasible], c=FEASIBLE, s=22,
                   label="feasible")
        ax.scatter([p.trial for p in done if not p.feasible], [p.energy for p in done if not p.feasible], c=BELOW,
                   s=22, label=f"recovery < gate {gate:g} (or an SLO missed)")
        best, running = None, []
        for p in done:
            if p.feasible and (best is None or p.energy < best):
                best = p.energy
            running.append(best if best is not None else math.nan)
        ax.step([p.trial for p in done], running, where="post", c=FRONT, label="best feasible so far")
        if reference is not None:
            ax.axhline(reference, ls=":", c="#555555", lw=0.8, label=f"reference {reference:.4g} J")
        # Trials that measured nothing: where they fell, on the axis.
        unmeasured = [t for t in finished if t.number not in {p.trial for p in pts} and not is_duplicate(t)]
        for kind, test, marker in (("pruned", lambda t: t.state == TrialState.PRUNED, "v"),
                                   ("infeasible", is_infeasible, "x"),
                                   ("failed", lambda t: t.state == TrialState.FAIL, "*")):
            numbers = [t.number for t in unmeasured if test(t)]
            if numbers:
                ax.scatter(numbers, [0.03] * len(numbers), marker=marker, c=OTHER, s=30, clip_on=False,
                           transform=ax.get_xaxis_transform(), label=f"{kind} (no energy measured)")
        if finished:
            ax.set_xlim(-0.5, max(t.number for t in finished) + 0.5)
        ax.set_xlabel("trial")
        ax.set_ylabel(ENERGY_AXIS)
        ax.set_title("optimisation history" + (", energy ESTIMATED" if "ESTIMATE" in energy_axis(study) else ""))
        ax.legend(fontsize=7, loc="best")
        made["history"] = _save(fig, out_dir / "history.png")

    complete = measured(study)
    ratios = [(t.number, t.user_attrs["metrics"]["floor_ratio"], bool(t.user_attrs.get("feasible")))
              for t in complete if "floor_ratio" in t.user_attrs.get("metrics", {})]
    if ratios:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.scatter([r[0] for r in ratios], [r[1] for r in ratios], c=[FEASIBLE if r[2] else BELOW for r in ratios],
                   s=20)
        ax.set_yscale("log")
        ax.set_xlabel("trial")
        ax.set_ylabel("measured energy / roofline at TDP [x]")
        estimated = any(t.user_attrs.get("energy_source") == "estimate" for t in complete)
        ax.set_title("distance to the data sheet's roofline at TDP (not a lower bound)" +
                     (" (against estimated energy)" if estimated else ""))
        made["floor"] = _save(fig, out_dir / "floor_ratio.png")

    if len(complete) >= 4 and len(study.directions) == 1:
        importances, evaluator = importances_of(complete)
        if importances:
            names = list(importances)[::-1]
            fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.6))
            ax.barh(names, [importances[n] for n in names], color=FEASIBLE)
            ax.set_xlabel(f"importance for {ENERGY_AXIS} (normalised to sum 1)")
            ax.set_title(f"parameter importances: {evaluator_label(evaluator)}, over {len(complete)} measured "
                         f"trials\n(feasible or not; gate {gate:g} not applied)", fontsize=9)
            made["importances"] = _save(fig, out_dir / "importances.png")
    return made


def importances_of(trials: list) -> tuple[dict[str, float], object]:
    """The parameters' importances for energy per request over `trials` (measured ones: infeasible
    trials' infinite values and duplicates left out), with the evaluator that computed them:
    Optuna 5's default, PED-ANOVA."""
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    copy = optuna.create_study()
    copy.add_trials(trials)
    try:
        with warnings.catch_warnings():  # "fewer than 2 trials in a regime": the figure's reader can't act on it
            warnings.simplefilter("ignore", UserWarning)
            return optuna.importance.get_param_importances(copy, evaluator=evaluator), evaluator
    except (RuntimeError, ValueError):
        return {}, evaluator
