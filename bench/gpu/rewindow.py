"""Re-read saved trials' steady-state windows with the current definition (search/windows.py),
from each trial's requests.csv (first token = ended_at - latency + ttft). Durations and levels only:
the energy share needs the reading's start, which the saved trace does not carry.

Usage: python bench/gpu/rewindow.py STUDY_DIR --out OUT.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402

from search.windows import steady_window  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = {}
    for trial in sorted(args.study_dir.glob("trial-*")):
        requests = trial / "requests.csv"
        if not requests.exists():
            continue
        seqs = yaml.safe_load((trial / "vllm_config.yaml").read_text())["max-num-seqs"]
        rows = [r for r in csv.DictReader(requests.open()) if not r["error"]]
        spans = [(float(r["ended_at"]) - float(r["latency_s"]) + float(r["ttft_s"]), float(r["ended_at"]))
                 for r in rows]
        window = steady_window(spans, seqs)
        out[trial.name] = {"max_num_seqs": seqs, "requests": len(rows),
                           "steady_window_s": window.duration_s if window else 0.0,
                           "steady_batch": window.level if window else 0}
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
