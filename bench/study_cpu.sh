#!/usr/bin/env bash
# The README's first command on a fresh home, timed: a 50-trial study of the embedded toy Gemma 4
# on vLLM's CPU build. Prints the wall time and the per-trial breakdown (bench/summarize_study.py).
# Usage: bench/study_cpu.sh [TRIALS] [HOME] [SUMMARY_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-50}
home=${2:-$(mktemp -d)/search-home}
start=$(date +%s.%N)
.venvs/main/bin/python -m search run --trials "$trials" --home "$home"
end=$(date +%s.%N)
.venvs/main/bin/python bench/summarize_study.py --home "$home" --wall "$(echo "$end - $start" | bc)" \
  ${3:+--out "$3"}
