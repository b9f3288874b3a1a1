#!/usr/bin/env bash
# The MLflow tracking server + model registry: artifacts proxied by the server into a directory,
# bound to loopback by default. The backend store (runs, metrics, registry) is PostgreSQL in
# production, its URL taken from the environment and never written to a file; without one it is
# a SQLite file in MLFLOW_DIR (one machine, the export tests).
#
#   export MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow  # e.g. from a secret store
#   MLFLOW_DIR=/srv/mlflow MLFLOW_PORT=5000 bash infra/mlflow/start_server.sh
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI  SQLAlchemy URL of the store: postgresql://USER[:PASSWORD]@HOST:PORT/DB
#                             (default: sqlite:///$MLFLOW_DIR/mlflow.db). Put the password in the
#                             environment or in ~/.pgpass (libpq reads it), never in this file.
#   MLFLOW_DIR      where artifacts/ (and the SQLite file) live  (default: ./mlflow-server)
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
store=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$dir/mlflow.db}
case "$store" in
  postgresql://*|postgresql+*://*|sqlite:///*) ;;
  *) echo "[mlflow] MLFLOW_BACKEND_STORE_URI must be postgresql://USER@HOST:PORT/DB (or sqlite:///PATH)," \
          "got '${store%%://*}://...'" >&2; exit 2 ;;
esac
# the store URL as logged: any password replaced by ***
shown=$(printf '%s' "$store" | sed -E 's#^([a-z0-9+]+://[^:/@]+):[^@]*@#\1:***@#')
echo "[mlflow] http://$host:$port  store: $shown  artifacts: $dir/artifacts" >&2
# The URL reaches mlflow through its own environment variable, not argv: argv is readable by every
# user of the machine (ps), the environment only by the server's user.
export MLFLOW_BACKEND_STORE_URI="$store"
# exec: the server replaces this shell, so stopping this process (or its group) stops the server
exec "$bin" server \
  --artifacts-destination "$dir/artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers" "$@"
