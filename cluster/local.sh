#!/usr/bin/env bash
# A real Ray cluster on one machine: a head node, one worker node and an MLflow tracking server,
# all on loopback, with Ray's token authentication on.
#
#   cluster/local.sh start     start all three; prints what to export and how to submit
#   cluster/local.sh status    what is running
#   cluster/local.sh stop      stop all three, and only them (other Ray clusters here are left alone)
#
# Settings (environment variables, defaults in brackets):
#   RAY_PORT [6379]  DASHBOARD_PORT [8265]  CLIENT_PORT [10001]  MLFLOW_PORT [5000; 0: no server]
#   HEAD_CPUS [0: the head only coordinates, as on a real cluster]  WORKER_CPUS [all cores]
#   STATE_DIR [~/.rayprefopt/local]: Ray's temp dir, the MLflow database and artifacts, logs, pids
#   RAY_AUTH_TOKEN_PATH [~/.ray/auth_token, generated if missing]: the cluster's token
#   BIND [127.0.0.1]: the address every server listens on. Anything else exposes the cluster.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's environment, activated or not: a submitted job's `python` is the raylet's.
if [[ -x "$REPO/.venv/bin/ray" ]]; then export PATH="$REPO/.venv/bin:$PATH"; fi

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
HEAD_CPUS="${HEAD_CPUS:-0}"
WORKER_CPUS="${WORKER_CPUS:-$(nproc)}"
STATE_DIR="${STATE_DIR:-$HOME/.rayprefopt/local}"
BIND="${BIND:-127.0.0.1}"
export RAY_AUTH_MODE=token

die() { echo "cluster/local.sh: $*" >&2; exit 1; }

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

port_open() { python -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$1" 2>/dev/null; }

wait_http() {  # url seconds pid: until the url answers, while pid lives
  local url="$1" deadline=$((SECONDS + $2)) pid="$3"
  until python -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null || return 1
    sleep 1
  done
}

token() {
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
  else
    ray get-auth-token --generate >/dev/null 2>&1  # ~/.ray/auth_token, created once
    chmod 600 "$HOME/.ray/auth_token"  # Ray writes it world-readable
  fi
}

start() {
  command -v ray >/dev/null || die "no 'ray' on PATH: run 'make setup' or activate the environment"
  [[ "$WORKER_CPUS" =~ ^[0-9]+$ && "$WORKER_CPUS" -ge 1 ]] || die "WORKER_CPUS=$WORKER_CPUS: need a whole number >= 1"
  local port
  for port in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" $([[ "$MLFLOW_PORT" != 0 ]] && echo "$MLFLOW_PORT"); do
    if port_open "$port"; then
      die "port $port is taken (a cluster already running? 'cluster/local.sh stop' first, or set the *_PORT variables)"
    fi
  done
  token
  mkdir -p "$STATE_DIR/logs"

  echo "Ray head on $BIND:$RAY_PORT (dashboard and job API on http://$BIND:$DASHBOARD_PORT)"
  ray start --head --node-ip-address="$BIND" --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" \
    --include-dashboard=true --dashboard-host="$BIND" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$(free_port)" --temp-dir="$STATE_DIR/ray" --disable-usage-stats \
    >"$STATE_DIR/logs/head.log" 2>&1 || { cat "$STATE_DIR/logs/head.log" >&2; die "the head did not start"; }

  # Each node on one machine needs its own agent port (Ray's default, 52365, is fixed). The nodes
  # share one session folder, so the head's log monitor already forwards this node's logs: a second
  # monitor would send every line (and every progress-bar update) to the driver twice.
  echo "Ray worker node with $WORKER_CPUS CPUs"
  ray start --address="$BIND:$RAY_PORT" --node-ip-address="$BIND" --num-cpus="$WORKER_CPUS" \
    --dashboard-agent-listen-port="$(free_port)" --include-log-monitor=false --disable-usage-stats \
    >"$STATE_DIR/logs/worker.log" 2>&1 || { cat "$STATE_DIR/logs/worker.log" >&2; die "the worker did not start"; }

  if [[ "$MLFLOW_PORT" != 0 ]]; then
    echo "MLflow server on http://$BIND:$MLFLOW_PORT (SQLite $STATE_DIR/mlflow.db, artifacts $STATE_DIR/mlartifacts)"
    nohup mlflow server --host "$BIND" --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" --artifacts-destination "$STATE_DIR/mlartifacts" \
      >"$STATE_DIR/logs/mlflow.log" 2>&1 &
    echo $! >"$STATE_DIR/mlflow.pid"
    wait_http "http://$BIND:$MLFLOW_PORT/health" 120 "$(cat "$STATE_DIR/mlflow.pid")" \
      || { tail -20 "$STATE_DIR/logs/mlflow.log" >&2; die "the MLflow server did not start (log: $STATE_DIR/logs/mlflow.log)"; }
  fi

  cat <<EOF
Ready. In the shell you submit from:
  export RAY_AUTH_MODE=token${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}
  ray job submit --address http://$BIND:$DASHBOARD_PORT --working-dir . -- python -m jobs.train
EOF
  if [[ "$MLFLOW_PORT" != 0 ]]; then
    echo "  (jobs log to MLflow with tracking.uri=http://$BIND:$MLFLOW_PORT, or the same as \$MLFLOW_TRACKING_URI in --runtime-env-json)"
  fi
}

stop() {
  if [[ -f "$STATE_DIR/mlflow.pid" ]]; then
    local pid
    pid="$(cat "$STATE_DIR/mlflow.pid")"
    # The server's workers are its children: end them with it.
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    rm -f "$STATE_DIR/mlflow.pid"
  fi
  # This cluster only, not every Ray on the machine (`ray stop` would end them all): the processes
  # that name its folder or its port, and everything they started.
  python - "$STATE_DIR/ray/" "$RAY_PORT" <<'PY'
import re, sys, psutil
folder, port = sys.argv[1], sys.argv[2]
def ours(p):
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return folder in cmd or re.search(rf"--(gcs[-_])?address=\S*:{port}\b", cmd) is not None
roots = [p for p in psutil.process_iter() if p.pid != psutil.Process().pid and ours(p)]
procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)] if p.is_running()}
for p in procs.values():
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(list(procs.values()), timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
print(f"stopped {len(procs)} processes")
PY
}

status() {
  ray status --address "127.0.0.1:$RAY_PORT" || echo "no Ray cluster on 127.0.0.1:$RAY_PORT"
  if [[ -f "$STATE_DIR/mlflow.pid" ]] && kill -0 "$(cat "$STATE_DIR/mlflow.pid")" 2>/dev/null; then
    echo "MLflow server: pid $(cat "$STATE_DIR/mlflow.pid") on port $MLFLOW_PORT"
  else
    echo "no MLflow server started by this script"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: cluster/local.sh start|status|stop" >&2; exit 2 ;;
esac
