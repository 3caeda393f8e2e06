#!/usr/bin/env bash
# Soak: the release binary in front of the end-to-end stand-ins (FastAPI + sse-starlette runtime,
# legacy Chat API), mixed traffic for SOAK_SECS (default 600) with periodic config reloads, then a
# summary: requests, failures by cause, latency p50/p90/p99, RSS and fd trend. Exit 1 on any
# failed request or a dead proxy. Not part of `make test`; run it with `make soak`.
#
#   SOAK_SECS           duration (default 600)
#   SOAK_CONCURRENCY    client workers (default 16)
#   SOAK_RELOAD_SECS    seconds between config rewrites (default 15; every 5th is broken)
#   SOAK_SAMPLE_SECS    RSS/fd sampling period (default 10)
#   CUTOVER_PROXY_BIN   binary to soak (default: target/release/cutover-proxy, built if missing)
#   PYTHON              interpreter with tests/e2e/requirements.txt (default: .venv/bin/python)
#   SOAK_KEEP=1         keep the work directory (config, logs) for a look afterwards
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

SOAK_SECS="${SOAK_SECS:-600}"
SOAK_CONCURRENCY="${SOAK_CONCURRENCY:-16}"
SOAK_RELOAD_SECS="${SOAK_RELOAD_SECS:-15}"
SOAK_SAMPLE_SECS="${SOAK_SAMPLE_SECS:-10}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="${CUTOVER_PROXY_BIN:-$REPO/target/release/cutover-proxy}"

if [ ! -x "$PYTHON" ]; then
    echo "soak: $PYTHON not found; run 'make venv' first" >&2
    exit 2
fi
if [ ! -x "$BIN" ]; then
    echo "soak: building the release binary" >&2
    cargo build --release
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cutover-soak.XXXXXX")"
PIDS=()
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "${SOAK_KEEP:-0}" = 1 ] || [ $status -ne 0 ]; then
        echo "soak: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $status
}
trap cleanup EXIT INT TERM

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port, what, pid
    for _ in $(seq 1 200); do
        if "$PYTHON" -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1', $1)))" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$3" 2>/dev/null; then
            echo "soak: $2 exited; log:" >&2
            tail -30 "$WORK/$2.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    echo "soak: $2 did not listen on port $1" >&2
    exit 1
}

# Each child in its own process group (setsid), so cleanup takes its children too.
start() { # name, command...
    local name=$1
    shift
    setsid "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

LEGACY_PORT=$(free_port)
RUNTIME_PORT=$(free_port)
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
METRICS_PORT=$(free_port)

export SOAK_JWT_SECRET="soak-jwt-secret-0123456789abcdef-$$-$RANDOM$RANDOM"
export SOAK_ADMIN_TOKEN="soak-admin-$$"

UVICORN=("$PYTHON" -m uvicorn --app-dir "$REPO/tests/e2e" --host 127.0.0.1 --log-level warning --no-access-log)
# Legacy (the Express stand-in) checks the callers' tokens too: the bridge calls it with each
# caller's own. All traffic comes from one address here: its per-IP limit is set out of reach.
LEGACY_JWT_SECRET="$SOAK_JWT_SECRET" PORT="$LEGACY_PORT" RATE_LIMIT_PER_MINUTE=1000000000 \
    start legacy node "$REPO/tests/e2e/legacy/app.js"
LEGACY_PID=${PIDS[-1]}
RUNTIME_SSE_SEP=crlf RUNTIME_SLOW_GAP=0.05 start runtime "${UVICORN[@]}" runtime_app:app --port "$RUNTIME_PORT"
RUNTIME_PID=${PIDS[-1]}
wait_port "$LEGACY_PORT" legacy "$LEGACY_PID"
wait_port "$RUNTIME_PORT" runtime "$RUNTIME_PID"

mkdir -p "$WORK/etc"
CONFIG="$WORK/etc/proxy.toml"
cat >"$CONFIG" <<EOF
# Written by scripts/soak.sh; bench/soak/soak.py rewrites runtime_orgs while the soak runs.
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
grace_period_secs = 2

[legacy]
address = "127.0.0.1:$LEGACY_PORT"

[runtime]
address = "127.0.0.1:$RUNTIME_PORT"
execution_timeout_ms = 20000
health_interval_ms = 1000

[rollout]
default_mode = "direct_llm"
runtime_orgs = ["org-a0", "org-a1", "org-a2", "org-a3"]

[identity]
jwt_secret_env = "SOAK_JWT_SECRET"

[breaker]
window_secs = 60

[admin]
token_env = "SOAK_ADMIN_TOKEN"
EOF

"$BIN" check --config "$CONFIG" >/dev/null
RUST_LOG="${RUST_LOG:-warn}" start proxy "$BIN" --config "$CONFIG"
PROXY_PID=${PIDS[-1]}
wait_port "$PROXY_PORT" proxy "$PROXY_PID"
wait_port "$METRICS_PORT" proxy "$PROXY_PID"

echo "soak: proxy pid $PROXY_PID on 127.0.0.1:$PROXY_PORT (legacy :$LEGACY_PORT, runtime :$RUNTIME_PORT), work dir $WORK"
set +e
"$PYTHON" "$REPO/bench/soak/soak.py" \
    --proxy "127.0.0.1:$PROXY_PORT" --metrics "127.0.0.1:$METRICS_PORT" \
    --legacy "127.0.0.1:$LEGACY_PORT" \
    --config "$CONFIG" --pid "$PROXY_PID" \
    --secs "$SOAK_SECS" --concurrency "$SOAK_CONCURRENCY" \
    --reload-every "$SOAK_RELOAD_SECS" --sample-every "$SOAK_SAMPLE_SECS"
STATUS=$?
set -e
PANICS=$(grep -c "panicked at" "$WORK/proxy.log" || true)
echo "proxy panics in its log: $PANICS"
if [ "$PANICS" != 0 ]; then
    grep -m5 "panicked at" "$WORK/proxy.log" >&2
    STATUS=1
fi
exit $STATUS
