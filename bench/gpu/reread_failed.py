"""Re-read a trial's first measured window from its saved answers.jsonl and power_trace.csv with the
current steady-state definition (search/windows.py): the window, its batch, and its energy per
output token integrated from the trace alone. For a trial whose window the product could not read
then; the trace's start is taken as the first request's send time (the meter starts just before
the load), and joules come from the trace's integral, not NVML's counter. Run it on a trial the
product did read too, to see what the approximation costs.

Usage: python bench/gpu/reread_failed.py TRIAL_DIR [TRIAL_DIR ...] --out OUT.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402

from search.windows import steady_window, trace_joules  # noqa: E402


def reread(trial: Path) -> dict:
    seqs = yaml.safe_load((trial / "vllm_config.yaml").read_text())["max-num-seqs"]
    rows = [json.loads(line) for line in (trial / "answers.jsonl").open()]
    served = [r for r in rows if not r["error"]]
    spans = [(r["ended_at"] - r["latency_s"] + r["ttft_s"], r["ended_at"]) for r in served]
    trace = [(float(r["t_s"]), float(r["watts"])) for r in csv.DictReader((trial / "power_trace.csv").open())]
    trace_start = min(r["ended_at"] - r["latency_s"] for r in served)
    window = steady_window(spans, seqs)
    out = {"trial": trial.name, "max_num_seqs": seqs, "requests": len(rows), "served": len(served),
           "whole_s": max(e for _, e in spans) - trace_start, "trace_s": trace[-1][0]}
    if window is None:
        return {**out, "steady_window_s": 0.0}
    # Tokens in the window, each request's output spread evenly from its first token to its end
    # (answers.jsonl keeps no token times).
    tokens = sum(r["completion_tokens"] * max(0.0, min(e, window.end) - max(s, window.start)) / (e - s)
                 for r, (s, e) in zip(served, spans) if e > s)
    joules = trace_joules(trace, window.start - trace_start, window.end - trace_start)
    whole_joules = trace_joules(trace, 0.0, trace[-1][0])
    whole_tokens = sum(r["completion_tokens"] for r in served)
    return {**out, "steady_window_s": window.duration_s, "steady_batch": window.level,
            "steady_tokens": tokens, "steady_trace_j": joules, "steady_j_per_output_token": joules / tokens,
            "steady_tokens_per_s": tokens / window.duration_s,
            "whole_trace_j": whole_joules, "whole_j_per_output_token": whole_joules / whole_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "trials": [reread(t) for t in args.trials]}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
