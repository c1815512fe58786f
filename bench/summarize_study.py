"""Per-trial time breakdown of a finished study: where a trial's time goes, and the orchestration share.

Orchestration = the study's wall time minus the baseline and minus every trial's compression,
serving, warm-up, workload and quality stages (Optuna, MLflow, progress, process bookkeeping, and
the time between trials); split into what the command pays once and what each trial pays. Usage: python bench/summarize_study.py --home HOME --wall SECONDS
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import study as study_mod  # noqa: E402

STAGES = ("compress", "serve", "warmup", "screen", "workload", "quality")


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
    parser.add_argument("--out", type=Path, default=None, help="also write the summary as JSON here")
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
    pruned = [t for t in trials if t.user_attrs.get("stage_times", {}).get("pruned_at_screen")]
    after_screen = [t.user_attrs["metrics"].get("time_workload_s", 0.0) + t.user_attrs["metrics"].get("time_quality_s", 0.0)
                    for t in trials if "time_workload_s" in t.user_attrs.get("metrics", {})]
    summary = {
        "trials": n, "counts": study_mod.counts(study), "wall_s": round(args.wall, 1),
        "wall_min": round(args.wall / 60, 1), "baseline_s": round(baseline, 1),
        "trial_s_median": round(statistics.median(durations), 1) if durations else None,
        "stage_s_per_trial": {s: round(v / n, 2) for s, v in per_stage.items()},
        "pruned_or_failed_s": round(unaccounted, 1),
        "server_reused": sum(1 for t in trials if t.user_attrs.get("metrics", {}).get("server_start_s", 1) == 0),
        "pruned_early": len(pruned),
        # What the screen-pruned trials did not spend: a completed trial's median measured window and
        # the scoring after it, times the number pruned (an estimate from this study's own trials).
        "pruning_saved_s": round(len(pruned) * statistics.median(after_screen), 1) if after_screen else 0.0,
        "orchestration_s_per_trial": round(overhead / n, 2),
        "orchestration_share": round(overhead / (args.wall - baseline), 4),
        "once_per_command_s": round(args.wall - baseline - span, 1),
        "orchestration_in_study_s_per_trial": round(per_trial, 2),
        "orchestration_in_study_share_of_median_trial": round(per_trial / statistics.median(durations), 4)
        if durations else None,
    }
    failed = [t for t in trials if t.state.name == "FAIL"]
    summary["failed_reasons"] = dict(Counter(t.user_attrs.get("reason", "?")[:120] for t in failed))
    # Causes the feasibility probe exists to catch: a CPU's instruction set or a missing vLLM kernel.
    summary["failed_from_isa_or_kernel"] = sum(1 for t in failed if ISA_OR_KERNEL.search(t.user_attrs.get("reason", "")))
    summary["infeasible_reasons"] = dict(Counter(t.user_attrs.get("reason", "?")[:120]
                                                 for t in trials if t.user_attrs.get("infeasible")))
    summary["unavailable_here"] = study.user_attrs.get("unavailable_here", [])
    summary["machine"] = machine()
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        **summary}, indent=2) + "\n")


ISA_OR_KERNEL = re.compile(r"AVX|AMX|cpu_gemm|_C'|_OpNamespace|requires x86|NotImplementedError", re.I)


def machine() -> dict:
    """The CPU by name and the flags that decide what vLLM's CPU build runs, and the versions."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "unknown")
    flags = set(next((l.split(":", 1)[1] for l in info if l.startswith("flags")), "").split())
    from importlib import metadata
    return {"cpu": model, "cores": os.cpu_count(), "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "optuna": metadata.version("optuna"), "mlflow": metadata.version("mlflow"),
            "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()
