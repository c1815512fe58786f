"""Where a trial's vLLM server start went, read from the `server.log`s a study kept.

Issue 25 item 2 asks for a server start on a compile-cache hit cut further; this says which part of
a start to cut, for every trial of a study, from the logs alone (no GPU):

    python bench/gpu/server_starts.py STUDY_DIR [--trials-csv FILE] [--out FILE]

STUDY_DIR is a study's folder of trial folders (`HOME/studies/NAME`, e.g. unpacked from a results
folder's product-study.tgz); --trials-csv is `search export`'s trials.csv of the same study, whose
time_serve_s (launch to ready, timed by the product) gives each start's whole. Per trial, seconds:
  api_start   launch to the API server's first log line (imports, argument parsing): whole less the rest
  api_config  the API server's first line to its last before the engine core's first (its configs)
  spawn_gap   the API server's last line before the engine core's first (the engine core's start)
  engine_init the engine core's first line to "init engine ... took" (weights, compile, profile,
              KV cache, CUDA graphs); compile is vLLM's own "torch.compile took" inside it
  api_ready   engine ready to "Starting vLLM server" (chat template, multimodal warm-up mm_warmup)
  cache       "hit" where vLLM loaded compiled graphs ("Directly load the compiled graph"), else "cold"
The log's clock has whole seconds: each part is +-1 s.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
from pathlib import Path

STAMP = re.compile(r"\b(\d\d-\d\d \d\d:\d\d:\d\d)\b")
COLUMNS = ("trial", "cache", "whole", "api_start", "api_config", "spawn_gap", "engine_init", "compile", "api_ready",
           "mm_warmup")


def _stamp(line: str) -> datetime.datetime | None:
    found = STAMP.search(line)
    return datetime.datetime.strptime(found.group(1), "%m-%d %H:%M:%S") if found else None


def _seconds_after(lines: list[str], needle: str, pattern: str) -> float | None:
    for line in lines:
        if needle in line:
            found = re.search(pattern, line)
            return float(found.group(1)) if found else None
    return None


def breakdown(log: str, whole_s: float | None = None) -> dict[str, float | str | None]:
    """The parts of one server start from its log (the log's lines, in order)."""
    lines = [line for line in log.splitlines() if _stamp(line)]
    api = [line for line in lines if line.startswith("(APIServer")]
    core = [line for line in lines if line.startswith("(EngineCore")]
    if not api or not core:
        raise ValueError("not a vLLM server log of an API server and an engine core")
    api_first, core_first = _stamp(api[0]), _stamp(core[0])
    before_core = [stamp for stamp in map(_stamp, api) if stamp <= core_first]
    init_done = next((_stamp(line) for line in core if "init engine" in line), None)
    ready = next((_stamp(line) for line in api if "Starting vLLM server" in line), None)
    return {
        "cache": "hit" if "Directly load the compiled graph" in log else "cold",
        "whole": None if whole_s is None else round(whole_s, 1),
        "api_config": (before_core[-1] - api_first).total_seconds() if before_core else None,
        "spawn_gap": (core_first - before_core[-1]).total_seconds() if before_core else None,
        "engine_init": (init_done - core_first).total_seconds() if init_done else None,
        "compile": _seconds_after(core, "torch.compile took", r"took ([\d.]+) s"),
        "api_ready": (ready - init_done).total_seconds() if ready and init_done else None,
        "mm_warmup": _seconds_after(api, "Multi-modal warmup completed", r"completed in ([\d.]+)s"),
        "api_start": round(whole_s - (ready - api_first).total_seconds(), 1) if whole_s is not None and ready else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="a study's folder of trial-NNNN folders")
    parser.add_argument("--trials-csv", type=Path, help="`search export`'s trials.csv (time_serve_s)")
    parser.add_argument("--out", type=Path, help="write the table here as well")
    args = parser.parse_args(argv)
    if not args.study_dir.is_dir():
        parser.error(f"{args.study_dir} is not a folder")
    serve_s: dict[int, float] = {}
    if args.trials_csv:
        with open(args.trials_csv, newline="") as handle:
            serve_s = {int(row["trial"]): float(row["time_serve_s"])
                       for row in csv.DictReader(handle) if row.get("time_serve_s")}
    rows = []
    for log in sorted(args.study_dir.glob("trial-*/server.log")):
        number = int(log.parent.name.split("-")[1])
        try:
            parts = breakdown(log.read_text(errors="replace"), serve_s.get(number))
        except ValueError as exc:
            print(f"trial {number}: {exc}", file=sys.stderr)
            continue
        rows.append({"trial": number, **parts})
    text = "\t".join(COLUMNS) + "\n" + "".join(
        "\t".join("" if row[c] is None else str(row[c]) for c in COLUMNS) + "\n" for row in rows)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
