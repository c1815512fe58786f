"""`python -m search ...` as the end-to-end tests run it: from the project root, in a home of the test's."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def run_cli(home, *args, timeout_s=1500):
    """Run the CLI and require exit status 0 (its stderr's end is the assertion's message)."""
    proc = subprocess.run([sys.executable, "-m", "search", *args, "--home", str(home)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
