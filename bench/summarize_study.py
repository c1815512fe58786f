"""Per-trial time breakdown of a finished study: where a trial's time goes, and the orchestration share.

Orchestration = the study's wall time minus the baseline and minus every trial's compression,
serving, warm-up, workload and quality stages (Optuna, MLflow, progress, process bookkeeping, and
the time between trials); split into what the command pays once and what each trial pays. Usage: python bench/summarize_study.py --home HOME --wall SECONDS
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import study as study_mod  # noqa: E402

STAGES = ("compress", "serve", "warmup", "workload_1", "quality_1", "workload_2", "quality_2")


def stage_seconds(trials) -> tuple[dict[str, float], float]:
    """Seconds of each stage summed over trials, and the whole duration of trials without stage times
    (counted as work, which understates the orchestration share)."""
    per_stage = {s: 0.0 for s in STAGES}
    unaccounted = 0.0
    for t in trials:
        metrics = t.user_attrs.get("metrics") or t.user_attrs.get("stage_times")
        if metrics is None:
            unaccounted += t.duration.total_seconds() if t.duration else 0.0
            continue
        for s in STAGES:
            per_stage[s] += metrics.get(f"time_{s}_s", 0.0)
    return per_stage, unaccounted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--study", default="gemma4-energy")
    parser.add_argument("--wall", type=float, required=True, help="wall seconds of the whole command")
    args = parser.parse_args()
    study = study_mod.load_study(args.study, f"sqlite:///{(args.home / 'optuna.db').resolve()}")
    trials = study.get_trials(deepcopy=False)
    per_stage, unaccounted = stage_seconds(trials)
    durations = [t.duration.total_seconds() for t in trials if t.duration]
    baseline = study.user_attrs.get("baseline_s", 0.0)
    work = sum(per_stage.values()) + unaccounted
    overhead = args.wall - baseline - work
    # From the first trial's start to the last one's end: what each trial costs besides its stages.
    # The rest of the overhead is paid once per command (imports, environment probes, the toy
    # model, the parent run's plots).
    timed = [t for t in trials if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in timed) - min(t.datetime_start for t in timed)).total_seconds()
    n = len(trials)
    per_trial = (span - work) / n
    summary = {
        "trials": n, "counts": study_mod.counts(study), "wall_s": round(args.wall, 1),
        "wall_min": round(args.wall / 60, 1), "baseline_s": round(baseline, 1),
        "trial_s_median": round(statistics.median(durations), 1) if durations else None,
        "stage_s_per_trial": {s: round(v / n, 2) for s, v in per_stage.items()},
        "pruned_or_failed_s": round(unaccounted, 1),
        "server_reused": sum(1 for t in trials if t.user_attrs.get("metrics", {}).get("server_start_s", 1) == 0),
        "pruned_early": sum(1 for t in trials if "pruning_saved_s" in t.user_attrs.get("stage_times", {})),
        # What the pruned trials' skipped second windows would have cost, at their first window's pace.
        "pruning_saved_s": round(sum(t.user_attrs.get("stage_times", {}).get("pruning_saved_s", 0.0)
                                     for t in trials), 1),
        "orchestration_s_per_trial": round(overhead / n, 2),
        "orchestration_share": round(overhead / (args.wall - baseline), 4),
        "once_per_command_s": round(args.wall - baseline - span, 1),
        "orchestration_in_study_s_per_trial": round(per_trial, 2),
        "orchestration_in_study_share_of_median_trial": round(per_trial / statistics.median(durations), 4)
        if durations else None,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
