#!/usr/bin/env bash
# A local MLflow tracking server + model registry: SQLite backend, artifacts proxied by the server
# and stored on local disk, bound to loopback by default. The export tests start it exactly so.
#
#   MLFLOW_DIR=/srv/mlflow MLFLOW_PORT=5000 bash infra/mlflow/start_server.sh
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Environment (all optional):
#   MLFLOW_DIR      where mlflow.db and artifacts/ live        (default: ./mlflow-server)
#   MLFLOW_HOST     interface to bind                          (default: 127.0.0.1 - loopback only)
#   MLFLOW_PORT     port                                       (default: 5000)
#   MLFLOW_WORKERS  server worker processes                    (default: 2)
#   MLFLOW_BIN      the mlflow executable                      (default: mlflow on PATH, else .venv/bin/mlflow)
# Binding another interface also needs --allowed-hosts (MLflow's DNS-rebinding guard): pass extra
# flags after the script name, e.g. `bash start_server.sh --allowed-hosts mlflow.internal:5000`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir=${MLFLOW_DIR:-$PWD/mlflow-server}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-2}
bin=${MLFLOW_BIN:-$(command -v mlflow || echo "$repo/.venv/bin/mlflow")}
mkdir -p "$dir/artifacts"
dir="$(cd "$dir" && pwd)"
echo "[mlflow] http://$host:$port  store: sqlite:///$dir/mlflow.db  artifacts: $dir/artifacts" >&2
# exec: the server replaces this shell, so stopping this process (or its group) stops the server
exec "$bin" server \
  --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers" "$@"
