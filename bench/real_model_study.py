"""A finished real-model study in numbers: which configurations pass and fail the gate and why, the
(energy, recovery) front, and whether the label-free signal predicts the labelled one (Spearman's
rho of label recovery against top-1 agreement and against top-k KL over the same trials).

Usage: python bench/real_model_study.py --home HOME --study NAME --out bench/results/FILE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.real_model_quality import machine  # noqa: E402
from search import study as study_mod  # noqa: E402
from search.export import Point, pareto_front  # noqa: E402
from search.summaries import counts, measured  # noqa: E402


def ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


SHOWN = ("compress.scheme", "compress.method", "compress.group_size", "compress.targets", "serve.kv_cache_dtype",
         "serve.max_num_seqs", "workload.verbosity", "workload.max_tokens")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def request_settings(rows: list[dict]) -> list[dict]:
    """What verbosity and max_tokens do on their own: the uncompressed trials, by the two settings
    (KV-cache dtype and max_num_seqs vary within a group)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["compress.scheme"] == "none":
            groups.setdefault((r["workload.verbosity"], r["workload.max_tokens"]), []).append(r)
    return [{"workload.verbosity": v, "workload.max_tokens": n, "trials": len(g),
             "tokens_per_answer": _mean([r["tokens_per_answer"] for r in g]),
             "recovery_mean": _mean([r["recovery_mean"] for r in g]),
             "top1_agreement": _mean([r["top1_agreement"] for r in g]),
             "energy_j_per_request": _mean([r["energy_j_per_request"] for r in g])}
            for (v, n), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def by_scheme(rows: list[dict]) -> list[dict]:
    """Pass and fail counts and mean recovery by compression scheme (and W4A16's method)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = r["compress.scheme"] + (f" {r['compress.method']}" if r["compress.scheme"] == "w4a16" else "")
        groups.setdefault(name, []).append(r)
    return [{"scheme": name, "trials": len(g), "passed": sum(r["feasible"] for r in g),
             "trial_s_total": sum(r["trial_s"] or 0.0 for r in g),
             "workload_s_range": [min(r["workload_s"] or 0.0 for r in g), max(r["workload_s"] or 0.0 for r in g)],
             "recovery_mean": _mean([r["recovery_mean"] for r in g]),
             "top1_agreement": _mean([r["top1_agreement"] for r in g]),
             "topk_kl": _mean([r["topk_kl"] for r in g]),
             "energy_j_per_request": _mean([r["energy_j_per_request"] for r in g])}
            for name, g in sorted(groups.items())]


def by_verbosity(rows: list[dict]) -> list[dict]:
    """The rank correlations and the schemes' mean signals under each system turn: top-1 agreement
    teacher-forces the trial's own prompt, so another system turn lowers it without any compression."""
    out = []
    for verbosity in sorted({r["workload.verbosity"] for r in rows}):
        group = [r for r in rows if r["workload.verbosity"] == verbosity]
        label = [r["recovery_mean"] for r in group]
        out.append({"workload.verbosity": verbosity, "n": len(group),
                    "recovery_vs_top1_agreement": spearman(label, [r["top1_agreement"] for r in group]),
                    "recovery_vs_topk_kl": spearman(label, [r["topk_kl"] for r in group]),
                    "by_scheme": by_scheme(group)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wall", type=float, default=None, help="the run command's wall seconds, if timed")
    args = parser.parse_args()
    study = study_mod.load_study(args.study, f"sqlite:///{(args.home / 'optuna.db').resolve()}")
    trials = measured(study)
    rows = []
    for t in trials:
        m, c = t.user_attrs.get("metrics", {}), t.user_attrs.get("config", {})
        rows.append({"trial": t.number, "feasible": bool(t.user_attrs.get("feasible")),
                     "energy_j_per_request": m.get("energy_j_per_request"), "recovery_mean": m.get("recovery_mean"),
                     "recovery_low_mean": float(np.mean([v for k, v in m.items()
                                                         if k.startswith("recovery_") and k.endswith("_low")])),
                     "top1_agreement": m.get("top1_agreement"), "topk_kl": m.get("topk_kl"),
                     "tokens_per_answer": m.get("tokens_per_answer"),
                     "trial_s": t.duration.total_seconds() if t.duration else None,
                     "workload_s": m.get("time_workload_s"), "screen_s": m.get("time_screen_s"),
                     **{k: c.get(k) for k in SHOWN}})
    for t, row in zip(trials, rows):
        row["energy_source"] = t.user_attrs.get("energy_source")
        # Which task kept a failing trial under the gate: the lowest per-task recovery.
        per_task = {k[len("recovery_"):]: v for k, v in t.user_attrs.get("metrics", {}).items()
                    if k.startswith("recovery_text_") and not k.endswith(("_low", "_high"))}
        row["weakest_task"] = min(per_task, key=per_task.get) if per_task else None
        row["weakest_recovery"] = min(per_task.values()) if per_task else None
    others = [t for t in study.get_trials(deepcopy=False) if t.number not in {r["trial"] for r in rows}]
    scored = [r for r in rows if r["top1_agreement"] is not None]
    label = [r["recovery_mean"] for r in scored]
    front = pareto_front([Point(r["trial"], r["energy_j_per_request"], r["recovery_mean"], r["feasible"]) for r in rows])
    out = {
        "command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "study": args.study, "wall_s": args.wall,
        "counts": counts(study),
        "passed": sum(r["feasible"] for r in rows), "failed_gate": sum(not r["feasible"] for r in rows),
        "not_measured": dict(Counter(t.user_attrs.get("reason", t.state.name).split(":")[0] for t in others)),
        "spearman": {"recovery_vs_top1_agreement": spearman(label, [r["top1_agreement"] for r in scored]),
                     "recovery_vs_topk_kl": spearman(label, [r["topk_kl"] for r in scored]), "n": len(scored)},
        "request_settings": request_settings(rows),
        "by_scheme": by_scheme(rows),
        "by_verbosity": by_verbosity(scored),
        "front": [{"trial": p.trial, "feasible": p.feasible, "energy_j_per_request": p.energy,
                   "recovery_mean": p.recovery} for p in front],
        "trials": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({k: out[k] for k in ("counts", "passed", "failed_gate", "spearman", "request_settings",
                                          "by_scheme")}, indent=2))


if __name__ == "__main__":
    main()
