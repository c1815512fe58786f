"""Per-trial energy table of a product study (the seed benchmark's table, issue 18's GPU evidence):
J/output token gross, net of idle and against the reference's, both windows, tokens/Wh, the repeat
spread, the roofline ratio, latency percentiles and where each trial's time went.

Usage: python bench/gpu/energy_table.py --home HOME [--study NAME] --out results.json [--md results.md] [--note TEXT]
Reads the study through Optuna alone (no GPU, no vLLM); every number comes from the trials' metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from search import study as study_mod  # noqa: E402

COLUMNS = [  # (metric, header, digits); net_j_per_output_token and vs_reference are derived here
    ("net_j_per_output_token", "net J/out tok", 4), ("vs_reference", "whole J/out tok vs reference", 2),
    ("tokens_per_wh", "tokens/Wh", 0), ("floor_ratio", "measured / floor", 1),
    ("steady_energy_j_per_request", "steady J/request", 3), ("whole_energy_j_per_request", "whole J/request", 3),
    ("steady_energy_j_per_output_token", "steady J/out tok", 4), ("energy_j_per_output_token", "whole J/out tok", 4),
    ("energy_j_per_request_rel_std", "repeat rel. std", 4), ("steady_window_s", "steady s", 1),
    ("window_s", "whole s", 1), ("steady_batch", "steady batch", 0), ("steady_tokens_per_s", "steady tok/s", 0),
    ("throughput_tok_s", "whole tok/s", 0), ("ttft_p50_ms", "TTFT p50 ms", 0), ("ttft_p99_ms", "TTFT p99 ms", 0),
    ("itl_p50_ms", "ITL p50 ms", 2), ("itl_p99_ms", "ITL p99 ms", 1), ("server_start_s", "server start s", 1),
    ("time_compress_s", "compress s", 1),
]
SETTINGS = ("compress.scheme", "serve.kv_cache_dtype", "serve.max_num_seqs", "serve.memory_budget_gib")


def rows(study) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        config = t.user_attrs.get("config") or {}
        metrics = t.user_attrs.get("metrics") or {}
        row = {"trial": t.number, "preset": t.user_attrs.get("preset"), "state": t.state.name,
               "reason": t.user_attrs.get("reason"), "duration_s": t.duration.total_seconds() if t.duration else None}
        row.update({key: config.get(key) for key in SETTINGS})
        row.update({key: metrics.get(key) for key, _, _ in COLUMNS})
        if row["whole_energy_j_per_request"] is None:  # a fixed job's objective is the whole run itself
            row["whole_energy_j_per_request"] = metrics.get("energy_j_per_request")
        gross, net = metrics.get("energy_j"), metrics.get("energy_net_j")
        if gross and net is not None and row["energy_j_per_output_token"] is not None:
            row["net_j_per_output_token"] = row["energy_j_per_output_token"] * net / gross
        out.append(row)
    reference = next((r["energy_j_per_output_token"] for r in out if r["preset"] == "reference"), None)
    for row in out:
        if reference and row["energy_j_per_output_token"] is not None:
            row["vs_reference"] = row["energy_j_per_output_token"] / reference
    return out


def markdown(table: list[dict]) -> str:
    head = ["trial", "preset", "state", *SETTINGS, *(h for _, h, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row["trial"]), str(row["preset"]), row["state"] + (f" ({row['reason']})" if row["reason"] else "")]
        cells += [str(row[key]) for key in SETTINGS]
        for key, _, digits in COLUMNS:
            value = row[key]
            cells.append("" if value is None else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--study", default="gemma4-energy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--note", default="", help="the command, machine and caveats, stored with the table")
    args = parser.parse_args()
    study = study_mod.load_study(args.study, f"sqlite:///{args.home / 'optuna.db'}")
    table = rows(study)
    args.out.write_text(json.dumps({"note": args.note, "study_attrs": study.user_attrs, "trials": table},
                                   indent=2, default=str))
    if args.md:
        args.md.write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
