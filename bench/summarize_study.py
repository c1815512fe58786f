"""Per-trial time breakdown of a finished study: where a trial's time goes, and the orchestration share.

Orchestration = the study's wall time minus the baseline and minus every trial's compression,
serving, warm-up, workload and quality stages (Optuna, MLflow, progress, process bookkeeping, and
the time between trials). Usage: python bench/summarize_study.py --home HOME --wall SECONDS
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--study", default="gemma4-energy")
    parser.add_argument("--wall", type=float, required=True, help="wall seconds of the whole command")
    args = parser.parse_args()
    study = study_mod.load_study(args.study, f"sqlite:///{(args.home / 'optuna.db').resolve()}")
    trials = study.get_trials(deepcopy=False)
    per_stage = {s: 0.0 for s in STAGES}
    durations = []
    for t in trials:
        metrics = t.user_attrs.get("metrics") or t.user_attrs.get("stage_times", {})
        for s in STAGES:
            per_stage[s] += metrics.get(f"time_{s}_s", 0.0)
        if t.duration:
            durations.append(t.duration.total_seconds())
    # Trials recorded before stage times were kept for every state: their whole duration counts as
    # work, which understates the orchestration share.
    unaccounted = sum(t.duration.total_seconds() for t in trials
                      if t.duration and not ({"metrics", "stage_times"} & set(t.user_attrs)))
    baseline = study.user_attrs.get("baseline_s", 0.0)
    work = sum(per_stage.values()) + unaccounted
    overhead = args.wall - baseline - work
    n = len(trials)
    summary = {
        "trials": n, "counts": study_mod.counts(study), "wall_s": round(args.wall, 1),
        "wall_min": round(args.wall / 60, 1), "baseline_s": round(baseline, 1),
        "trial_s_median": round(statistics.median(durations), 1) if durations else None,
        "stage_s_per_trial": {s: round(v / n, 2) for s, v in per_stage.items()},
        "pruned_or_failed_s": round(unaccounted, 1),
        "server_reused": sum(1 for t in trials if t.user_attrs.get("metrics", {}).get("server_start_s", 1) == 0),
        "orchestration_s_per_trial": round(overhead / n, 2),
        "orchestration_share": round(overhead / (args.wall - baseline), 4),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
