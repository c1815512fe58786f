#!/usr/bin/env bash
# Screenshots of the MLflow UI for a study, taken with headless Chromium (Debian's `chromium`):
# the study's feasible trials sorted by energy per request, and the parent run's Pareto plot.
# SHOT_WIDTH sets the window width in pixels (default 1800).
# Usage: mlflow/screenshot.sh HOME OUT_DIR [STUDY]
set -euo pipefail
home=$(cd "${1:?search home, e.g. .search}" && pwd)
out=${2:?output folder}
study=${3:-gemma4-energy}
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$here/.venvs/main/bin/mlflow" ui --backend-store-uri "sqlite:///$home/mlflow.db" --host 127.0.0.1 --port "$port" \
  >"$out/mlflow-ui.log" 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
read -r experiment parent < <("$here/.venvs/main/bin/python" - "$home" "$study" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
exp = client.get_experiment_by_name(sys.argv[2])
parent = client.search_runs([exp.experiment_id], "tags.`search.study_parent` = 'true'")[0]
print(exp.experiment_id, parent.info.run_id)
PY
)
shoot() {
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --window-size=${SHOT_WIDTH:-1800},1000 --virtual-time-budget=20000 --screenshot="$2" "$1" 2>/dev/null
}
base="http://127.0.0.1:$port"
shoot "$base/#/experiments/$experiment/runs?searchFilter=tags.feasible%20%3D%20%27true%27&orderByKey=metrics.%60energy_j_per_request%60&orderByAsc=true" "$out/mlflow-runs.png"
shoot "$base/#/experiments/$experiment/runs/$parent/artifacts/pareto.png" "$out/mlflow-pareto.png"
echo "$out/mlflow-runs.png $out/mlflow-pareto.png"
