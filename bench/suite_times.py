"""The test suite's wall time and slowest tests from a `pytest --durations=N` log, as JSON.

Usage: python bench/suite_times.py LOG --command "..." --commit SHA --note TEXT --out OUT.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from pathlib import Path


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    return {"model": model.group(1) if model else "unknown", "cores": text.count("processor\t:"),
            "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--command", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = args.log.read_text()
    summary = re.findall(r"^=*\s*(\d+ passed.*in [\d.]+s.*?)\s*=*$", text, re.M)
    slowest = [{"seconds": float(s), "phase": phase, "test": test}
               for s, phase, test in re.findall(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)$", text, re.M)]
    result = {"command": args.command, "commit": args.commit, "note": args.note,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**cpu(), "python": platform.python_version()},
              "summary": summary[-1] if summary else None, "slowest": slowest}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("summary", "machine")}))


if __name__ == "__main__":
    main()
