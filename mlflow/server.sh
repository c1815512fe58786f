#!/usr/bin/env bash
# A shared MLflow tracking server for many workers (one machine runs it; workers pass
# --mlflow-uri http://HOST:5000). Single-machine studies need none of this: they log to
# sqlite:///.search/mlflow.db, which `mlflow ui` reads directly (see mlflow/README.md).
# Usage: mlflow/server.sh BACKEND_URI ARTIFACT_ROOT [HOST] [PORT]
# HOST is 127.0.0.1 unless given: the server has no authentication, so put some in front of it
# before it listens on a wider address (mlflow/README.md, "Many workers").
set -euo pipefail
backend=${1:?backend store URI, e.g. postgresql://mlflow@db/mlflow or sqlite:///mlflow.db}
artifacts=${2:?artifact root, e.g. /shared/mlartifacts}
host=${3:-127.0.0.1}
port=${4:-5000}
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venvs/main/bin/mlflow" server --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" --serve-artifacts --host "$host" --port "$port"
