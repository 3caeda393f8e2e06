#!/usr/bin/env bash
# Side-by-side benchmarks of cutover-proxy against direct access and nginx (issue 8), in one
# session, loopback only, every run bounded. Writes bench/results.md; raw outputs in bench/out/.
#
#   1. non-chat passthrough: wrk on a small JSON GET, direct / nginx (1 worker, auto) / HAProxy /
#      the lean forwarder (examples/lean_forwarder.rs: the floor of Pingora's lower layer) /
#      cutover-proxy; the last three at each of BENCH_PROXY_THREADS
#   2. SSE on the runtime path: first event and total time of a 10k-event runtime stream,
#      direct vs through the proxy (rewrite on), rewritten events per CPU-second
#   3. N idle SSE streams held through the proxy (and nginx): RSS per stream
#   4. the conversation bridge: first event with the bridge off, on (cached lookups), on with a
#      new session each chat and on without the cache, against a legacy stand-in with the bridge's routes; one legacy round trip
#   5. the commit point: first event and first content from a runtime that plans (two thinking
#      events, then text), the head held (pre_content = "hold") vs streamed (the default), bridge
#      off and on; and a rescue in the open stream against a direct legacy answer
#   6. instruction counts under callgrind, each process alone, warm-up excluded: per passthrough
#      request (nginx, HAProxy, cutover-proxy's lean and Pingora paths), per rewritten runtime
#      event (the rewrite alone, and through the proxy beside nginx relaying), per held stream
#      set-up; BENCH_CG_RUNS runs each
#
# Usage: make bench          (release build, then this script; ~15 minutes)
#        BENCH_QUICK=1 make bench   (a few minutes: smoke run)
#        BENCH_SECTIONS=4 bench/run.sh   (only those sections; the others stay as they are in
#                                         results.md)
# Needs: nginx, haproxy, wrk, python3 (stdlib only), curl, valgrind — scripts/install-deps.sh bench
# installs them; section 1 also the lean forwarder: cargo build --release --example lean_forwarder;
# section 6 the rewrite alone: cargo build --release --example rewrite_ir.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TOOL="python3 $ROOT/bench/benchtool.py"
OUT=${BENCH_OUT:-$ROOT/bench/out}
QUICK=${BENCH_QUICK:-0}

# ---- knobs ---------------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}
  PT_ROUNDS=${BENCH_PT_ROUNDS:-$ROUNDS}
  DURATION=${BENCH_DURATION:-3s}
  SSE_STREAMS=${BENCH_SSE_STREAMS:-20}      # per case and round
  IDLE_N=${BENCH_IDLE_N:-1000}
  IDLE_ROUNDS=${BENCH_IDLE_ROUNDS:-1}
  NGINX_AUTO=${BENCH_NGINX_AUTO:-0}
  CG_RUNS=${BENCH_CG_RUNS:-1}
else
  ROUNDS=${BENCH_ROUNDS:-3}
  # Section 1's p99s are judged by a rank test over its rounds: with three a side it cannot
  # reject at 95 % whatever the figures, with six it can. Shorter rounds keep the time the same.
  PT_ROUNDS=${BENCH_PT_ROUNDS:-6}
  DURATION=${BENCH_DURATION:-5s}
  SSE_STREAMS=${BENCH_SSE_STREAMS:-200}
  IDLE_N=${BENCH_IDLE_N:-1000 10000}
  # Section 3's RSS per stream at 1,000 streams moves by about 1 KiB between runs of the same
  # code (pages, the allocator's timing): the median of three rounds is reported.
  IDLE_ROUNDS=${BENCH_IDLE_ROUNDS:-3}
  NGINX_AUTO=${BENCH_NGINX_AUTO:-1}
fi
CONNS=${BENCH_CONNS:-50}
WRK_THREADS=${BENCH_WRK_THREADS:-1}
PROXY_THREADS=${BENCH_PROXY_THREADS:-1 2}     # one cutover-proxy per value, all measured
SSE_THREADS=${BENCH_SSE_THREADS:-2}           # the proxy used for section 3 (section 2 runs each)
UPSTREAM_WORKERS=${BENCH_UPSTREAM_WORKERS:-1}
SSE_CHUNKS=${BENCH_SSE_CHUNKS:-10000}
SECTIONS=${BENCH_SECTIONS:-1 2 3 4 5 6}
CG_RUNS=${CG_RUNS:-${BENCH_CG_RUNS:-3}}       # section 6: fresh processes per count
CG_CONNS=${BENCH_CG_CONNS:-10}                # section 6: the passthrough mix, connections ×
CG_REQUESTS=${BENCH_CG_REQUESTS:-100}         #   requests on each
CG_STREAMS=${BENCH_CG_STREAMS:-100}           # section 6: held streams set up per count
CG_SSE=${BENCH_CG_SSE:-3}                     # section 6: 10k-event streams per count
BRIDGE_STREAMS=${BENCH_BRIDGE_STREAMS:-$((SSE_STREAMS * 2))}   # per case and round
COMMIT_STREAMS=${BENCH_COMMIT_STREAMS:-$((SSE_STREAMS > 100 ? 100 : SSE_STREAMS))}   # per case and round (40 ms each)
PLAN_GAP_MS=${BENCH_PLAN_GAP_MS:-20}                            # between the planning runtime's events
section() { case " $SECTIONS " in *" $1 "*) return 0;; esac; return 1; }
if [ -n "${CUTOVER_PROXY_BIN:-}" ]; then
  PROXY_BIN=$CUTOVER_PROXY_BIN
else
  PROXY_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/cutover-proxy
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
LEAN_BIN=${BENCH_LEAN_BIN:-$(dirname "$PROXY_BIN")/examples/lean_forwarder}
REWRITE_BIN=${BENCH_REWRITE_BIN:-$(dirname "$PROXY_BIN")/examples/rewrite_ir}

# ---- loopback ports ------------------------------------------------------------------------
# All from BENCH_PORT_BASE (18000), so that a second run on the same machine can use others;
# below the ephemeral range, where the bench's own outgoing connections would take them.
P=${BENCH_PORT_BASE:-18000}
EPHEMERAL=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ $((P + 700)) -lt "$EPHEMERAL" ] || { echo "BENCH_PORT_BASE=$P: its ports reach the ephemeral range (from $EPHEMERAL)" >&2; exit 1; }
LEGACY_PORT=$((P + 81))          # upstream nginx: canned JSON
RUNTIME_PORT=$((P + 82))         # upstream nginx: canned runtime SSE stream + /health
IDLE_RUNTIME_PORT=$((P + 83))    # python: first event, then holds
NGINX1_PORT=$((P + 70))
NGINXA_PORT=$((P + 71))
NGINX_IDLE_PORT=$((P + 72))
IDLE_PROXY_PORT=$((P + 200))
BRIDGE_LEGACY_PORT=$((P + 84))   # upstream nginx: the bridge's legacy routes
BRIDGE_PROXY_PORT=$((P + 300))    # section 4's proxies: +0 off, +10 on, +20 on without cache
PLANNING_RUNTIME_PORT=$((P + 85))  # python: thinks, then answers (or fails); also legacy's chat route
COMMIT_PROXY_PORT=$((P + 400))    # section 5's proxies: +0 +10 hold, +20 +30 stream (bridge off, on), +40 rescue
CG_NGINX_PORT=$((P + 600))       # section 6, one at a time: nginx, HAProxy, cutover-proxy (+10, +11, +12)
CG_HAPROXY_PORT=$((P + 601))
CG_PROXY_PORT=$((P + 610))
STREAM_PATH=/api/v1/execute/stream
PT_PATH=/api/v1/bench/status
CHAT_PATH=/api/v1/chat/sessions/bench-session
export BENCH_JWT_SECRET=bench-jwt-secret-$$
export BENCH_ADMIN_TOKEN=bench-admin-token-$$

proxy_port() { echo $((P + 100 + 10 * $1)); }
haproxy_port() { echo $((P + 400 + $1)); }
lean_port() { echo $((P + 500 + $1)); }

# ---- process bookkeeping: only what this script started, by pid ------------------------------
declare -A PIDS=()      # name -> pid
declare -A STOPSIG=()   # name -> signal that stops it promptly
log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

start() { # name signal cmd...
  local name=$1 sig=$2; shift 2
  "$@" >"$OUT/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
  STOPSIG[$name]=$sig
}

stop() { # name
  local name=$1 pid=${PIDS[$1]:-}
  [ -n "$pid" ] || return 0
  kill "-${STOPSIG[$name]}" "$pid" 2>/dev/null || true
  for _ in $(seq 1 "${STOP_TRIES:-100}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PIDS[$name]"
}

cleanup() {
  local name
  for name in "${!PIDS[@]}"; do stop "$name"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port [seconds] [name]
  local port=$1 secs=${2:-10} name=${3:-}
  for _ in $(seq 1 $((secs * 20))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if [ -n "$name" ] && ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
      cat "$OUT/logs/$name.log" >&2 || true
      die "$name exited before listening on $port"
    fi
    sleep 0.05
  done
  die "nothing listening on 127.0.0.1:$port after ${secs}s${name:+ ($name)}"
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

children_of() { # pid -> its child pids (nginx workers)
  local p
  for p in /proc/[0-9]*; do
    [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

# ---- preflight -----------------------------------------------------------------------------
for tool in wrk python3 curl; do command -v $tool >/dev/null || die "$tool missing (scripts/install-deps.sh bench)"; done
[ -x "$NGINX" ] || die "nginx missing (scripts/install-deps.sh bench)"
[ -x "$PROXY_BIN" ] || die "$PROXY_BIN missing: run 'cargo build --release' (make bench does)"
if section 1; then
  [ -x "$HAPROXY" ] || die "haproxy missing (scripts/install-deps.sh bench)"
  [ -x "$LEAN_BIN" ] || die "$LEAN_BIN missing: run 'cargo build --release --example lean_forwarder' (make bench does)"
fi
if section 6; then
  command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
    || die "valgrind missing (scripts/install-deps.sh bench)"
  [ -x "$HAPROXY" ] || die "haproxy missing (scripts/install-deps.sh bench)"
  [ -x "$REWRITE_BIN" ] || die "$REWRITE_BIN missing: run 'cargo build --release --example rewrite_ir' (make bench does)"
fi
for p in $LEGACY_PORT $RUNTIME_PORT $IDLE_RUNTIME_PORT $NGINX1_PORT $NGINXA_PORT $NGINX_IDLE_PORT \
         $IDLE_PROXY_PORT $((IDLE_PROXY_PORT + 1)) $((IDLE_PROXY_PORT + 2)) $BRIDGE_LEGACY_PORT \
         $(seq $BRIDGE_PROXY_PORT $((BRIDGE_PROXY_PORT + 22))) $CG_NGINX_PORT $CG_HAPROXY_PORT \
         $CG_PROXY_PORT $((CG_PROXY_PORT + 1)) $((CG_PROXY_PORT + 2)); do
  port_free "$p" || die "port $p is in use"
done
for t in $PROXY_THREADS; do
  for p in $(proxy_port "$t") $(($(proxy_port "$t") + 1)) $(($(proxy_port "$t") + 2)) \
           $(haproxy_port "$t") $(lean_port "$t"); do
    port_free "$p" || die "port $p is in use"
  done
done
case " $PROXY_THREADS " in *" $SSE_THREADS "*) ;; *) die "BENCH_SSE_THREADS=$SSE_THREADS must be one of BENCH_PROXY_THREADS=($PROXY_THREADS)";; esac

# A run of some sections keeps the other sections' raw outputs (the report takes results.md's
# text for sections it has no data for).
if [ "$SECTIONS" = "1 2 3 4 5 6" ]; then
  rm -rf "$OUT"
else
  for n in $SECTIONS; do
    case $n in
      1) rm -rf "$OUT/passthrough.json" "$OUT/passthrough.jsonl" "$OUT/wrk" ;;
      2) rm -rf "$OUT/sse.json" "$OUT/sse" ;;
      3) rm -rf "$OUT/idle.json" "$OUT/idle.jsonl" "$OUT/idle" ;;
      4) rm -rf "$OUT/bridge.json" "$OUT/bridge" ;;
      5) rm -rf "$OUT/commit.json" "$OUT/commit" ;;
      6) rm -rf "$OUT/counts.json" "$OUT/cg" ;;
      *) die "BENCH_SECTIONS: no section $n (1 2 3 4 5 6)" ;;
    esac
  done
  rm -rf "$OUT/nginx" "$OUT/conf" "$OUT/logs"
fi
mkdir -p "$OUT"/{logs,wrk,sse,idle,bridge,commit,cg,nginx/tmp,nginx/www,conf}
PREFIX=$OUT/nginx

if [ -n "${MAKELEVEL:-}" ]; then
  COMMAND="make bench"
else
  COMMAND="bench/run.sh"
fi
[ "$QUICK" = 1 ] && COMMAND="BENCH_QUICK=1 $COMMAND"
for v in BENCH_SECTIONS BENCH_BRIDGE_STREAMS BENCH_COMMIT_STREAMS BENCH_PLAN_GAP_MS BENCH_ROUNDS BENCH_PT_ROUNDS BENCH_DURATION BENCH_CONNS BENCH_WRK_THREADS BENCH_PROXY_THREADS \
         BENCH_SSE_THREADS BENCH_SSE_STREAMS BENCH_IDLE_N BENCH_IDLE_ROUNDS BENCH_NGINX_AUTO BENCH_UPSTREAM_WORKERS \
         BENCH_SSE_CHUNKS CUTOVER_PROXY_BIN BENCH_LEAN_BIN BENCH_REWRITE_BIN BENCH_CG_RUNS \
         BENCH_CG_CONNS BENCH_CG_REQUESTS BENCH_CG_STREAMS BENCH_CG_SSE BENCH_PORT_BASE; do
  [ -n "${!v:-}" ] && COMMAND="$v='${!v}' $COMMAND"
done

NOFILE_HARD=$(ulimit -Hn)
ulimit -n "$NOFILE_HARD" 2>/dev/null || true
NOFILE=$(ulimit -n)

$TOOL collect "$OUT/meta.json" \
  --set "command=$COMMAND" \
  --set "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --set "quick=$([ "$QUICK" = 1 ] && echo true || echo false)" \
  --set "nproc=$(nproc)" \
  --set "cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)" \
  --set "mem=$(awk '/^MemTotal/{printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)" \
  --set "kernel=$(uname -r)" \
  --set "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" \
  --set "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+dirty')" \
  --set "proxy_version=$("$PROXY_BIN" --version | awk '{print $2}')" \
  --set "nginx=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')" \
  --set "haproxy=$("$HAPROXY" -v 2>/dev/null | awk 'NR==1{print "HAProxy " $3}')" \
  --set "wrk=wrk $(wrk --version 2>&1 | head -1 | awk '{print $2}')" \
  --set "python=$(python3 -c 'import platform;print(platform.python_version())')" \
  --set "nofile=$NOFILE" \
  --set "sections=$SECTIONS"
log "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); proxy: $PROXY_BIN; out: $OUT"

# ---- upstreams -----------------------------------------------------------------------------
# A ~200-byte JSON body, like a small legacy API answer.
JSON_BODY='{"service":"legacy","status":"ok","version":"2026.02.1","region":"local","items":[{"id":1,"name":"alpha","enabled":true},{"id":2,"name":"beta","enabled":false}],"requestId":"bench-0000000000000000000"}'
JSON_BYTES=${#JSON_BODY}
$TOOL gen-sse "$PREFIX/www/runtime-stream.sse" --chunks "$SSE_CHUNKS" >&2
$TOOL gen-sse "$PREFIX/www/runtime-short.sse" --chunks 10 >&2
SSE_BYTES=$(stat -c %s "$PREFIX/www/runtime-stream.sse")

$TOOL gen-bridge "$PREFIX/bridge"

$TOOL render bench/nginx-upstream.conf "$OUT/conf/upstream.conf" \
  "PREFIX=$PREFIX" "UPSTREAM_WORKERS=$UPSTREAM_WORKERS" "LEGACY_PORT=$LEGACY_PORT" \
  "RUNTIME_PORT=$RUNTIME_PORT" "STREAM_PATH=$STREAM_PATH" "JSON_BODY=$JSON_BODY" \
  "BRIDGE_LEGACY_PORT=$BRIDGE_LEGACY_PORT"
"$NGINX" -t -q -p "$PREFIX" -e "$PREFIX/startup.log" -c "$OUT/conf/upstream.conf" \
  2>"$OUT/logs/upstream-check.log" || { cat "$OUT/logs/upstream-check.log" >&2; die "upstream nginx config invalid"; }
start upstream TERM "$NGINX" -p "$PREFIX" -e "$PREFIX/startup.log" -c "$OUT/conf/upstream.conf" -g 'daemon off;'
wait_port $LEGACY_PORT 10 upstream
wait_port $RUNTIME_PORT 10 upstream

nginx_proxy() { # name workers port runtime_port (master_process off under callgrind)
  local name=$1 workers=$2 port=$3 rport=$4 global='daemon off;'
  [ ${#UNDER[@]} -eq 0 ] || global='daemon off; master_process off;'
  $TOOL render bench/nginx-proxy.conf "$OUT/conf/$name.conf" \
    "PREFIX=$PREFIX" "NAME=$name" "WORKERS=$workers" "PORT=$port" "LEGACY_PORT=$LEGACY_PORT" \
    "RUNTIME_PORT=$rport" "STREAM_PATH=$STREAM_PATH" "NOFILE=$NOFILE" \
    "WORKER_CONNECTIONS=$((NOFILE + 10000))"
  "$NGINX" -t -q -p "$PREFIX" -e "$PREFIX/startup.log" -c "$OUT/conf/$name.conf" \
    2>"$OUT/logs/$name-check.log" || { cat "$OUT/logs/$name-check.log" >&2; die "$name config invalid"; }
  start "$name" TERM "${UNDER[@]}" "$NGINX" -p "$PREFIX" -e "$PREFIX/startup.log" -c "$OUT/conf/$name.conf" -g "$global"
  wait_port "$port" $((${#UNDER[@]} ? 120 : 10)) "$name"
}

# Section 6 sets these around a call: the proxy runs under callgrind, or takes Pingora's path;
# section 5 keeps the breaker out of its rescues.
UNDER=()
LEAN_PASSTHROUGH=true
BREAKER_MIN_REQUESTS=10
cutover_proxy() { # name threads port runtime_port [legacy_port bridge_enabled bridge_cache_ttl_ms commit_timeout_ms pre_content]
  local name=$1 threads=$2 port=$3 rport=$4 lport=${5:-$LEGACY_PORT} bridge=${6:-false} ttl=${7:-30000}
  local commit=${8:-5000} pre=${9:-stream}
  $TOOL render bench/proxy.toml.in "$OUT/conf/$name.toml" \
    "PROXY_PORT=$port" "ADMIN_PORT=$((port + 1))" "METRICS_PORT=$((port + 2))" \
    "THREADS=$threads" "LEGACY_PORT=$lport" "RUNTIME_PORT=$rport" "STREAM_PATH=$STREAM_PATH" \
    "BRIDGE_ENABLED=$bridge" "BRIDGE_CACHE_TTL_MS=$ttl" "COMMIT_TIMEOUT_MS=$commit" \
    "PRE_CONTENT=$pre" "LEAN_PASSTHROUGH=$LEAN_PASSTHROUGH" "BREAKER_MIN_REQUESTS=$BREAKER_MIN_REQUESTS"
  "$PROXY_BIN" check --config "$OUT/conf/$name.toml" >/dev/null || die "$name config invalid"
  # SIGINT: Pingora's fast shutdown (SIGTERM would drain for grace_period_secs).
  start "$name" INT "${UNDER[@]}" "$PROXY_BIN" --config "$OUT/conf/$name.toml"
  wait_port "$port" $((${#UNDER[@]} ? 180 : 20)) "$name"
}

haproxy_proxy() { # name threads port
  local name=$1 threads=$2 port=$3
  $TOOL render bench/haproxy.cfg "$OUT/conf/$name.cfg" \
    "THREADS=$threads" "PORT=$port" "LEGACY_PORT=$LEGACY_PORT" "MAXCONN=$((NOFILE / 2 - 100))"
  "$HAPROXY" -c -q -f "$OUT/conf/$name.cfg" >"$OUT/logs/$name-check.log" 2>&1 \
    || { cat "$OUT/logs/$name-check.log" >&2; die "$name config invalid"; }
  # -db: foreground, one process (its threads are the workers); SIGTERM stops it at once.
  start "$name" TERM "${UNDER[@]}" "$HAPROXY" -db -f "$OUT/conf/$name.cfg"
  wait_port "$port" $((${#UNDER[@]} ? 120 : 10)) "$name"
}

lean_forwarder() { # name threads port
  local name=$1 threads=$2 port=$3
  # SIGINT: Pingora's fast shutdown.
  start "$name" INT "$LEAN_BIN" "127.0.0.1:$port" "127.0.0.1:$LEGACY_PORT" "$threads"
  wait_port "$port" 20 "$name"
}

# Sections 1 and 2 measure the same proxies (bridge off: the stream path alone).
# nginx (one worker, and auto workers with BENCH_NGINX_AUTO) is the plain proxy both compare
# against (section 2: the same stream, relayed without a rewrite).
if section 1 || section 2; then
  for t in $PROXY_THREADS; do
    cutover_proxy "proxy-t$t" "$t" "$(proxy_port "$t")" $RUNTIME_PORT
  done
  nginx_proxy nginx-1w 1 $NGINX1_PORT $RUNTIME_PORT
  NGINX_SSE=("1:$NGINX1_PORT")
  if [ "$NGINX_AUTO" = 1 ]; then
    nginx_proxy nginx-auto auto $NGINXA_PORT $RUNTIME_PORT
    NGINX_SSE+=("$(nproc):$NGINXA_PORT")
  fi
fi

# ---- 1. passthrough ------------------------------------------------------------------------
if section 1; then
  log "section 1: passthrough (wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $PT_ROUNDS round(s))"
  CASES=("direct=direct (client → upstream)")
  declare -A CASE_PORT=([direct]=$LEGACY_PORT)
  CASES+=("nginx-1w=nginx, 1 worker"); CASE_PORT[nginx-1w]=$NGINX1_PORT
  if [ "$NGINX_AUTO" = 1 ]; then
    CASES+=("nginx-auto=nginx, auto workers ($(nproc))"); CASE_PORT[nginx-auto]=$NGINXA_PORT
  fi
  for t in $PROXY_THREADS; do
    haproxy_proxy "haproxy-t$t" "$t" "$(haproxy_port "$t")"
    CASES+=("haproxy-t$t=HAProxy, nbthread $t"); CASE_PORT[haproxy-t$t]=$(haproxy_port "$t")
  done
  for t in $PROXY_THREADS; do
    lean_forwarder "lean-t$t" "$t" "$(lean_port "$t")"
    CASES+=("lean-t$t=lean forwarder (Pingora ServerApp), threads = $t"); CASE_PORT[lean-t$t]=$(lean_port "$t")
  done
  for t in $PROXY_THREADS; do
    CASES+=("proxy-t$t=cutover-proxy, threads = $t"); CASE_PORT[proxy-t$t]=$(proxy_port "$t")
  done

  # Sanity: every path answers the canned body with 200.
  for c in "${CASES[@]}"; do
    name=${c%%=*}
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:${CASE_PORT[$name]}$PT_PATH")
    [ "$got" = "200 $JSON_BYTES" ] || die "$name: GET $PT_PATH answered '$got', expected '200 $JSON_BYTES'"
  done
  # Whose CPU time is counted per case: the tier under test (for direct, the upstream itself).
  declare -A CASE_PIDS=()
  CASE_PIDS[direct]="${PIDS[upstream]} $(children_of "${PIDS[upstream]}")"
  for c in "${CASES[@]}"; do
    name=${c%%=*}
    case $name in
      nginx-*) CASE_PIDS[$name]="${PIDS[$name]} $(children_of "${PIDS[$name]}")" ;;
      proxy-* | haproxy-* | lean-*) CASE_PIDS[$name]=${PIDS[$name]} ;;
    esac
  done

  # Warm-up: fill keep-alive pools and caches, not recorded.
  for c in "${CASES[@]}"; do
    name=${c%%=*}
    wrk -t"$WRK_THREADS" -c"$CONNS" -d1s "http://127.0.0.1:${CASE_PORT[$name]}$PT_PATH" >/dev/null
  done
  : >"$OUT/passthrough.jsonl"
  for r in $(seq 1 "$PT_ROUNDS"); do
    for c in "${CASES[@]}"; do
      name=${c%%=*}
      # shellcheck disable=SC2086 # pid lists
      $TOOL wrk "http://127.0.0.1:${CASE_PORT[$name]}$PT_PATH" --out "$OUT/wrk/$name-r$r.txt" \
        --case "$name" --round "$r" --threads "$WRK_THREADS" --connections "$CONNS" \
        --duration "$DURATION" --pids ${CASE_PIDS[$name]} >>"$OUT/passthrough.jsonl"
    done
  done
  case_args=()
  for c in "${CASES[@]}"; do case_args+=(--case "$c"); done
  $TOOL collect "$OUT/passthrough.json" --jsonl "$OUT/passthrough.jsonl" "${case_args[@]}" \
    --set "rounds=$PT_ROUNDS" --set "duration=$DURATION" --set "connections=$CONNS" \
    --set "wrk_threads=$WRK_THREADS" --set "body_bytes=$JSON_BYTES" \
    --set "upstream_workers=$UPSTREAM_WORKERS"
  for t in $PROXY_THREADS; do stop "haproxy-t$t"; stop "lean-t$t"; done
fi

# ---- 2. SSE on the runtime path ------------------------------------------------------------
if section 2; then
  log "section 2: SSE, ${SSE_CHUNKS}-chunk runtime stream ($SSE_BYTES bytes), $ROUNDS × $SSE_STREAMS streams per case"
  for r in $(seq 1 "$ROUNDS"); do
    # The long stream is the measurement; the short one (12 frames) shows the fixed per-request
    # part of the first-event time, without the first read's worth of frames to rewrite.
    for stream in long short; do
      $TOOL sse --kind direct --stream $stream --port $RUNTIME_PORT --path $STREAM_PATH \
        --count "$SSE_STREAMS" --out "$OUT/sse/direct-$stream-r$r.json" >&2
      for n in "${NGINX_SSE[@]}"; do
        $TOOL sse --kind nginx --threads "${n%%:*}" --stream $stream --port "${n#*:}" \
          --path $CHAT_PATH --count "$SSE_STREAMS" --out "$OUT/sse/nginx-w${n%%:*}-$stream-r$r.json" >&2
      done
      for t in $PROXY_THREADS; do
        $TOOL sse --kind proxy --threads "$t" --stream $stream --port "$(proxy_port "$t")" \
          --path $CHAT_PATH --org org-bench --cpu-pid "${PIDS[proxy-t$t]}" --count "$SSE_STREAMS" \
          --out "$OUT/sse/proxy-t$t-$stream-r$r.json" >&2
      done
    done
  done
  # The proxies' own count of time to first event (request to first byte written, by histogram
  # bucket), to set beside what the client saw: a tail in one and not the other is outside the proxy.
  for t in $PROXY_THREADS; do
    curl -s "http://127.0.0.1:$(($(proxy_port "$t") + 2))/metrics" >"$OUT/sse/proxy-t$t.metrics" || true
  done
  sse_files=()
  for f in "$OUT"/sse/*.json; do sse_files+=(--json "$f"); done
  $TOOL collect "$OUT/sse.json" "${sse_files[@]}" \
    --set "rounds=$ROUNDS" --set "per_round=$SSE_STREAMS" \
    --set "chunks=$SSE_CHUNKS" --set "runtime_frames=$((SSE_CHUNKS + 2))" --set "stream_bytes=$SSE_BYTES"
fi

# Sections 1 and 2 are done: stop their proxies.
for t in $PROXY_THREADS; do stop "proxy-t$t"; done
stop nginx-1w; stop nginx-auto

# ---- 3. idle streams -----------------------------------------------------------------------
if section 3; then
  # Each stream holds two descriptors in the proxy (client + runtime connection).
  MAX_STREAMS=$(((NOFILE - 200) / 2))
  log "section 3: idle streams (N = $IDLE_N, $IDLE_ROUNDS round(s); open-files limit $NOFILE → at most $MAX_STREAMS per process)"
  NOTE=""
  : >"$OUT/idle.jsonl"

  idle_run() { # case n round
    local case=$1 want=$2 n=$2 pid pids before after ready="$OUT/idle/$1-$2-r$3.ready" waited
    if [ "$n" -gt "$MAX_STREAMS" ]; then
      n=$MAX_STREAMS
      NOTE="$want streams requested, $n opened: the open-files limit here is $NOFILE (hard), and each proxied stream needs two descriptors. Raise \`ulimit -Hn\` to measure exactly $want."
    fi
    start idle-runtime TERM python3 bench/benchtool.py idle-runtime --port $IDLE_RUNTIME_PORT
    wait_port $IDLE_RUNTIME_PORT 10 idle-runtime
    if [ "$case" = proxy ]; then
      cutover_proxy idle-proxy "$SSE_THREADS" $IDLE_PROXY_PORT $IDLE_RUNTIME_PORT
      pid=${PIDS[idle-proxy]}; pids=$pid; port=$IDLE_PROXY_PORT; path=$CHAT_PATH
    elif [ "$case" = proxy-bridge ]; then
      # The conversation bridge on, as the product runs: section 4's legacy stand-in.
      cutover_proxy idle-proxy "$SSE_THREADS" $IDLE_PROXY_PORT $IDLE_RUNTIME_PORT $BRIDGE_LEGACY_PORT true 30000
      pid=${PIDS[idle-proxy]}; pids=$pid; port=$IDLE_PROXY_PORT; path=$CHAT_PATH
    else
      nginx_proxy nginx-idle 1 $NGINX_IDLE_PORT $IDLE_RUNTIME_PORT
      pid=${PIDS[nginx-idle]}; port=$NGINX_IDLE_PORT; path=$CHAT_PATH
    fi
    # A few streams first, so that one-off allocations (runtime threads, pools, lazily built
    # state) count in the baseline rather than per stream.
    $TOOL idle-client --port "$port" --path "$path" --org org-bench --n 20 --hold 0 \
      --ready-file "$OUT/idle/$case-$want-r$3.warm" >/dev/null
    sleep 1
    [ "$case" = nginx-1w ] && pids="$pid $(children_of "$pid")"   # nginx: master + worker
    before=$($TOOL rss $pids)
    start idle-client TERM python3 bench/benchtool.py idle-client --port "$port" --path "$path" \
      --org org-bench --n "$n" --hold 600 --timeout 60 --ready-file "$ready"
    waited=0
    while [ ! -s "$ready" ]; do
      sleep 0.2; waited=$((waited + 1))
      [ $waited -lt 900 ] || die "idle client: $n streams not established after 180 s"
      kill -0 "${PIDS[idle-client]}" 2>/dev/null || { cat "$OUT/logs/idle-client.log" >&2; die "idle client died"; }
    done
    sleep 1   # let the proxy settle (relay tasks parked, buffers at steady state)
    after=$($TOOL rss $pids)
    [ "$case" = nginx-1w ] || curl -s "http://127.0.0.1:$((IDLE_PROXY_PORT + 2))/metrics" \
      >"$OUT/idle/$case-$want-r$3.metrics" || true
    $TOOL idle-record "$ready" "$case" "$want" "$before" "$after" >>"$OUT/idle.jsonl"
    stop idle-client
    if [ "$case" = nginx-1w ]; then stop nginx-idle; else stop idle-proxy; fi
    stop idle-runtime
  }

  # Rounds interleave the cases, so that a slow spell of the machine falls on all of them.
  for r in $(seq 1 "$IDLE_ROUNDS"); do
    for n in $IDLE_N; do
      idle_run proxy "$n" "$r"
      idle_run proxy-bridge "$n" "$r"
      idle_run nginx-1w "$n" "$r"
    done
  done
  $TOOL collect "$OUT/idle.json" --jsonl "$OUT/idle.jsonl" --set "threads=$SSE_THREADS" \
    --set "nofile=$NOFILE" --set "note=$NOTE" --set "rounds=$IDLE_ROUNDS"
fi

# ---- 4. the conversation bridge ------------------------------------------------------------
# The same short runtime stream, through three proxies whose legacy is a stand-in with the
# bridge's routes: bridge off (the runtime owns its conversations), on (session and agent
# cached after the first chat, as in steady traffic on one session), on with no cache (every
# lookup asks legacy). Each of the bridge's calls is also timed on its own, on a keep-alive
# connection like the proxy's pooled ones: the bridge's cost reads in round trips.
if section 4; then
  log "section 4: bridge off / on / on without cache, $ROUNDS × $BRIDGE_STREAMS short streams per case"
  BRIDGE_CASES=("off=bridge off" "on=bridge on (session, agent cached)"
                "newsession=bridge on, a new session each chat (agent cached)" "nocache=bridge on, no cache")
  # The new-session case runs on the cached proxy: every chat names a session it has not seen
  # (`{i}`), whose agent it has cached, so the session lookup and the history read both go out.
  declare -A BRIDGE_PORT=([off]=$BRIDGE_PROXY_PORT [on]=$((BRIDGE_PROXY_PORT + 10))
                          [newsession]=$((BRIDGE_PROXY_PORT + 10)) [nocache]=$((BRIDGE_PROXY_PORT + 20)))
  declare -A BRIDGE_PATH=([off]=$CHAT_PATH [on]=$CHAT_PATH [newsession]="/api/v1/chat/sessions/bench-{i}"
                          [nocache]=$CHAT_PATH)
  cutover_proxy bridge-off 1 "${BRIDGE_PORT[off]}" $RUNTIME_PORT $BRIDGE_LEGACY_PORT false 30000
  cutover_proxy bridge-on 1 "${BRIDGE_PORT[on]}" $RUNTIME_PORT $BRIDGE_LEGACY_PORT true 30000
  cutover_proxy bridge-nocache 1 "${BRIDGE_PORT[nocache]}" $RUNTIME_PORT $BRIDGE_LEGACY_PORT true 0
  for r in $(seq 1 "$ROUNDS"); do
    # The session route (cached in steady traffic), the history (read on every chat) and the
    # user message's save (at the commit, before the first event): the bridge's calls, one each.
    $TOOL rtt --port $BRIDGE_LEGACY_PORT --route session --path /api/v1/sessions/bench-session \
      --count "$BRIDGE_STREAMS" --out "$OUT/bridge/rtt-session-r$r.json"
    $TOOL rtt --port $BRIDGE_LEGACY_PORT --route messages --path /api/v1/sessions/bench-session/messages \
      --count "$BRIDGE_STREAMS" --out "$OUT/bridge/rtt-messages-r$r.json"
    $TOOL rtt --port $BRIDGE_LEGACY_PORT --route save --method POST \
      --body '{"role":"user","content":"How does the bridge keep this conversation?"}' \
      --path /api/v1/sessions/bench-session/messages \
      --count "$BRIDGE_STREAMS" --out "$OUT/bridge/rtt-save-r$r.json"
    for c in "${BRIDGE_CASES[@]}"; do
      name=${c%%=*}
      before=$($TOOL bridge-counts --port $((BRIDGE_PORT[$name] + 2)))
      $TOOL sse --kind proxy --case "$name" --threads 1 --stream short --port "${BRIDGE_PORT[$name]}" \
        --path "${BRIDGE_PATH[$name]}" --org org-bench --count "$BRIDGE_STREAMS" \
        --out "$OUT/bridge/$name-r$r.json" >&2
      after=$($TOOL bridge-counts --port $((BRIDGE_PORT[$name] + 2)))
      printf '{"case":"%s","round":%s,"before":%s,"after":%s}\n' "$name" "$r" "$before" "$after" \
        >>"$OUT/bridge/calls.jsonl"
    done
  done
  curl -s "http://127.0.0.1:$((BRIDGE_PORT[on] + 2))/metrics" >"$OUT/bridge/on.metrics" || true
  bridge_files=()
  for f in "$OUT"/bridge/*-r*.json; do bridge_files+=(--json "$f"); done
  case_args=()
  for c in "${BRIDGE_CASES[@]}"; do case_args+=(--case "$c"); done
  $TOOL collect "$OUT/bridge.json" "${bridge_files[@]}" --jsonl "$OUT/bridge/calls.jsonl" \
    "${case_args[@]}" --set "rounds=$ROUNDS" --set "per_round=$BRIDGE_STREAMS" \
    --set "warmup=2" --set "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
    --set "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --set "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" --set "command=$COMMAND"
  stop bridge-off; stop bridge-on; stop bridge-nocache
fi

# ---- 5. the commit point -------------------------------------------------------------------
# A runtime that plans before it answers (two thinking events, then the text), through proxies
# that hold the client's head until the first content (pre_content = "hold") or stream the head
# and the status at once (the default), each with the bridge off and on (section 4's legacy
# stand-in, cached lookups): when the user first sees something, and when the first content.
# Then the rescue: the same planning ending in an execution_error, continued in the open stream
# by legacy's answer (the planning runtime is legacy's chat route too), against the same legacy
# answering a chat routed to it directly: what the rescue costs over a direct legacy answer.
if section 5; then
  log "section 5: hold / stream, bridge off / on, rescue / direct legacy, $ROUNDS × $COMMIT_STREAMS planning streams per case"
  start planning-runtime TERM python3 bench/benchtool.py planning-runtime --port $PLANNING_RUNTIME_PORT \
    --gap-ms "$PLAN_GAP_MS"
  wait_port $PLANNING_RUNTIME_PORT 10 planning-runtime
  COMMIT_CASES=("hold-bridge-off=hold, bridge off" "hold-bridge-on=hold, bridge on"
                "stream-bridge-off=stream, bridge off" "stream-bridge-on=stream, bridge on"
                "rescued=stream, the runtime fails: rescued by legacy" "direct=legacy, routed to it directly")
  declare -A COMMIT_PORT=()
  i=0
  for c in "${COMMIT_CASES[@]}"; do
    name=${c%%=*}
    case $name in direct) continue ;; esac
    COMMIT_PORT[$name]=$((COMMIT_PROXY_PORT + 10 * i)); i=$((i + 1))
    case $name in hold-*) pre=hold ;; *) pre=stream ;; esac
    case $name in *-bridge-on) bridge=true lport=$BRIDGE_LEGACY_PORT ;;
                  rescued) bridge=false lport=$PLANNING_RUNTIME_PORT ;;
                  *) bridge=false lport=$BRIDGE_LEGACY_PORT ;; esac
    case $name in rescued) BREAKER_MIN_REQUESTS=1000000000 ;; *) BREAKER_MIN_REQUESTS=10 ;; esac
    cutover_proxy "commit-$name" 1 "${COMMIT_PORT[$name]}" $PLANNING_RUNTIME_PORT "$lport" \
      "$bridge" 30000 5000 "$pre"
  done
  BREAKER_MIN_REQUESTS=10
  # The direct legacy chats go through the rescue's proxy: its legacy is the same stand-in.
  COMMIT_PORT[direct]=${COMMIT_PORT[rescued]}
  for r in $(seq 1 "$ROUNDS"); do
    for c in "${COMMIT_CASES[@]}"; do
      name=${c%%=*}
      case $name in rescued) org=org-bench msg=benchmark-fail ;;
                    direct) org=org-legacy msg=benchmark ;;
                    *) org=org-bench msg=benchmark ;; esac
      $TOOL sse --kind proxy --case "$name" --threads 1 --stream short --port "${COMMIT_PORT[$name]}" \
        --path $CHAT_PATH --org "$org" --message "$msg" --count "$COMMIT_STREAMS" \
        --out "$OUT/commit/$name-r$r.json" >&2
    done
  done
  commit_files=()
  for f in "$OUT"/commit/*-r*.json; do commit_files+=(--json "$f"); done
  case_args=()
  for c in "${COMMIT_CASES[@]}"; do case_args+=(--case "$c"); done
  $TOOL collect "$OUT/commit.json" "${commit_files[@]}" "${case_args[@]}" \
    --set "rounds=$ROUNDS" --set "per_round=$COMMIT_STREAMS" --set "gap_ms=$PLAN_GAP_MS" \
    --set "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
    --set "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --set "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" --set "command=$COMMAND"
  for c in "${COMMIT_CASES[@]}"; do
    case ${c%%=*} in direct) ;; *) stop "commit-${c%%=*}" ;; esac
  done
  stop planning-runtime
fi

# ---- 6. instruction counts -----------------------------------------------------------------
# What a request, an event or a stream costs in instructions retired, counted by callgrind: nearly
# the same from run to run on a noisy machine, where time is not. Each server runs alone under
# callgrind (the upstream stand-ins, the client and the load outside it); after a warm-up its
# counters are zeroed, the same mix is sent to each, and the window is dumped
# (`callgrind_control -z` / `-d`, which works for a multi-threaded binary as for nginx). Every
# count is made CG_RUNS times, each time in a fresh process.
if section 6; then
  log "section 6: instruction counts under callgrind ($CG_RUNS runs each)"
  : >"$OUT/cg/counts.jsonl"
  STOP_TRIES=600   # a process under callgrind takes a while to stop
  under_callgrind() { # name run: the next process started runs under callgrind
    # Names written out in full: each dump reads on its own (callgrind_annotate).
    UNDER=(valgrind --tool=callgrind --vgdb=yes --compress-strings=no --compress-pos=no
           --callgrind-out-file="$OUT/cg/$1-r$2.out")
  }

  cg_window() { # name case what run units|@json-file cmd...: zero, run cmd, dump, record
    local name=$1 case=$2 what=$3 run=$4 units=$5 pid dump; shift 5
    pid=${PIDS[$name]}
    callgrind_control -z "$pid" >/dev/null
    "$@"
    callgrind_control -d "$pid" >/dev/null
    dump=$(ls -v "$OUT/cg/$name-r$run.out".* 2>/dev/null | tail -1)
    [ -n "$dump" ] || die "$name: no callgrind dump"
    if [ "${units#@}" != "$units" ]; then
      $TOOL cg-record "$dump" --case "$case" --what "$what" --run "$run" \
        --units-from "${units#@}" --units-key "${UNITS_KEY:-requests}" --units-scale "${UNITS_SCALE:-1}" \
        >>"$OUT/cg/counts.jsonl"
    else
      $TOOL cg-record "$dump" --case "$case" --what "$what" --run "$run" --units "$units" \
        >>"$OUT/cg/counts.jsonl"
    fi
  }
  mix() { # port: the passthrough mix, its request count in $OUT/cg/mix.json
    $TOOL keepalive --port "$1" --path $PT_PATH --conns "$CG_CONNS" --requests "$CG_REQUESTS" \
      >"$OUT/cg/mix.json"
  }
  warm() { # port
    $TOOL keepalive --port "$1" --path $PT_PATH --conns 2 --requests 50 >/dev/null
  }

  # The rewrite alone: the text_chunk stream and the recorded runtime mix, read by read as the
  # relay does, one pass uncounted first (examples/rewrite_ir.rs).
  for r in $(seq 1 "$CG_RUNS"); do
    for what in "text:text 20000 3" "table:file tests/fixtures/runtime/table.sse 300"; do
      case=${what%%:*}
      # shellcheck disable=SC2086 # the example's arguments
      valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*rewrite_ir::measured*' \
        --callgrind-out-file="$OUT/cg/rewrite-$case-r$r.out" "$REWRITE_BIN" ${what#*:} \
        >"$OUT/cg/rewrite-$case-r$r.json" 2>"$OUT/logs/rewrite-$case-r$r.log" \
        || { cat "$OUT/logs/rewrite-$case-r$r.log" >&2; die "rewrite_ir $case failed"; }
      passes=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["passes"])' "$OUT/cg/rewrite-$case-r$r.json")
      $TOOL cg-record "$OUT/cg/rewrite-$case-r$r.out" --case "rewrite-$case" --what event --run "$r" \
        --units-from "$OUT/cg/rewrite-$case-r$r.json" --units-key runtime_events --units-scale "$passes" \
        >>"$OUT/cg/counts.jsonl"
    done
  done

  # And its speed on this machine: events per CPU-second of the thread (its own CPU clock, so
  # the time other processes had the core is left out), the best of ten passes and the median.
  for r in $(seq 1 "$CG_RUNS"); do
    "$REWRITE_BIN" text 200000 10 --cpu >"$OUT/cg/rewrite-cpu-r$r.json"
  done

  for r in $(seq 1 "$CG_RUNS"); do
    # Passthrough: the same keep-alive GETs through each, one worker each.
    under_callgrind nginx-cg "$r"
    nginx_proxy nginx-cg 1 $CG_NGINX_PORT $RUNTIME_PORT
    UNDER=()
    warm $CG_NGINX_PORT
    cg_window nginx-cg nginx passthrough "$r" "@$OUT/cg/mix.json" mix $CG_NGINX_PORT
    # The same 10k-event stream relayed unchanged, per runtime frame.
    UNITS_KEY=events_per_stream UNITS_SCALE=$CG_SSE \
      cg_window nginx-cg nginx event "$r" "@$OUT/cg/sse-nginx-r$r.json" \
      $TOOL sse --kind nginx --threads 1 --stream long --port $CG_NGINX_PORT --path $CHAT_PATH \
        --count "$CG_SSE" --warmup 0 --timeout 300 --out "$OUT/cg/sse-nginx-r$r.json"
    stop nginx-cg

    under_callgrind haproxy-cg "$r"
    haproxy_proxy haproxy-cg 1 $CG_HAPROXY_PORT
    UNDER=()
    warm $CG_HAPROXY_PORT
    cg_window haproxy-cg haproxy passthrough "$r" "@$OUT/cg/mix.json" mix $CG_HAPROXY_PORT
    stop haproxy-cg

    # cutover-proxy, one thread: the lean path (the default), then a rewritten stream.
    under_callgrind proxy-cg "$r"
    cutover_proxy proxy-cg 1 $CG_PROXY_PORT $RUNTIME_PORT
    UNDER=()
    warm $CG_PROXY_PORT
    cg_window proxy-cg proxy-lean passthrough "$r" "@$OUT/cg/mix.json" mix $CG_PROXY_PORT
    $TOOL sse --kind proxy --threads 1 --stream long --port $CG_PROXY_PORT --path $CHAT_PATH \
      --org org-bench --count 1 --warmup 0 --timeout 300 --out "$OUT/cg/sse-warm.json" >&2
    UNITS_KEY=events_per_stream UNITS_SCALE=$CG_SSE \
      cg_window proxy-cg proxy event "$r" "@$OUT/cg/sse-proxy-r$r.json" \
      $TOOL sse --kind proxy --threads 1 --stream long --port $CG_PROXY_PORT --path $CHAT_PATH \
        --org org-bench --count "$CG_SSE" --warmup 0 --timeout 300 --out "$OUT/cg/sse-proxy-r$r.json"
    stop proxy-cg

    # Pingora's path: the same requests with the lean passthrough off.
    LEAN_PASSTHROUGH=false
    under_callgrind pingora-cg "$r"
    cutover_proxy pingora-cg 1 $CG_PROXY_PORT $RUNTIME_PORT
    UNDER=()
    LEAN_PASSTHROUGH=true
    warm $CG_PROXY_PORT
    cg_window pingora-cg proxy-pingora passthrough "$r" "@$OUT/cg/mix.json" mix $CG_PROXY_PORT
    stop pingora-cg

    # Held streams: set up CG_STREAMS streams (request, runtime connection, first event) and
    # count what that took, through nginx and through the proxy (bridge off).
    start idle-runtime TERM python3 bench/benchtool.py idle-runtime --port $IDLE_RUNTIME_PORT
    wait_port $IDLE_RUNTIME_PORT 10 idle-runtime
    for who in nginx proxy; do
      under_callgrind "held-$who" "$r"
      if [ $who = nginx ]; then
        nginx_proxy held-nginx 1 $CG_NGINX_PORT $IDLE_RUNTIME_PORT; port=$CG_NGINX_PORT
      else
        cutover_proxy held-proxy 1 $CG_PROXY_PORT $IDLE_RUNTIME_PORT; port=$CG_PROXY_PORT
      fi
      UNDER=()
      $TOOL idle-client --port $port --path $CHAT_PATH --org org-bench --n 5 --hold 0 \
        --ready-file "$OUT/cg/held-$who-r$r.warm" >/dev/null
      held() {
        start held-client TERM python3 bench/benchtool.py idle-client --port "$port" --path $CHAT_PATH \
          --org org-bench --n "$CG_STREAMS" --hold 600 --timeout 120 --ready-file "$OUT/cg/held-$who-r$r.ready"
        local waited=0
        while [ ! -s "$OUT/cg/held-$who-r$r.ready" ]; do
          sleep 0.2; waited=$((waited + 1))
          [ $waited -lt 900 ] || die "held streams: not established after 180 s"
        done
      }
      UNITS_KEY=established cg_window "held-$who" "$who" stream "$r" "@$OUT/cg/held-$who-r$r.ready" held
      stop held-client
      stop "held-$who"
    done
    stop idle-runtime
  done
  cpu_files=()
  for f in "$OUT"/cg/rewrite-cpu-r*.json; do cpu_files+=(--set "cpu_$(basename "$f" .json)=$(cat "$f")"); done
  $TOOL collect "$OUT/counts.json" --jsonl "$OUT/cg/counts.jsonl" --set "count_runs=$CG_RUNS" "${cpu_files[@]}" \
    --set "conns=$CG_CONNS" --set "requests=$CG_REQUESTS" --set "streams=$CG_STREAMS" \
    --set "sse_streams=$CG_SSE" --set "valgrind=$(valgrind --version)"
  STOP_TRIES=100
fi

stop upstream
$TOOL report "$OUT" bench/results.md
log "done: bench/results.md (raw outputs in ${OUT#"$ROOT"/}/)"
