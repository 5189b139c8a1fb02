#!/usr/bin/env bash
# Load benchmark for SPEC.md's "Bars": throughput, latency and memory of the full proxy against
# the same upstream reached directly, through nginx injecting a static bearer, and through a
# minimal Pingora pass-through, with the same worker count and the same load generator.
#
#   bash benches/load.sh            # compare (a) upstream, (b) nginx, (c) pass-through (and (j)
#                                   # on jemalloc), (d) proxy, (e) proxy without shaping
#   bash benches/load.sh scaling    # (d) at 1/32/256 connections, 10/10,000 clients, 1/1,000 grants
#   QUICK=1 bash benches/load.sh    # CI: 2-second runs, one round; checks every config answers
#   bash benches/load.sh callgrind  # instructions per request of (c) and (d) under callgrind, by
#                                   # layer: counts, not seconds, so a busy machine does not move
#                                   # them (CG_REQUESTS requests on one keep-alive connection, 2000)
#   bash benches/load.sh cpu        # CPU per request only (user and system, saturating load) of
#                                   # (c), (j) and (d), and of (d0) BASELINE_BIN and (d1)
#                                   # BASELINE2_BIN (other builds of the proxy) when set: a
#                                   # before/after from one run (ROUNDS, 3); context switches per
#                                   # request, and CPU by thread;
#                                   # PERF=1 adds a flat native profile of each (perf, no call graph),
#                                   # FLAMEGRAPH=1 call graphs, inclusive shares and flame graphs
#   bash benches/load.sh knobs      # Pingora's knobs one by one on the pass-through, beside (b)
#                                   # nginx and (d) the proxy: CPU per request and throughput
#                                   # (KNOBS="c c-accept" compares only those, beside (b))
#
# Settings (environment): DURATION (s, default 10; QUICK: 2), ROUNDS (default 2 in compare mode,
# 1 in scaling mode; QUICK: 1), CONNS (default 32), PACE_MS (compare mode's paced runs: each
# connection's mean pause between requests, default 32 ms, about 1,000 req/s in all), WORKERS
# (nginx worker_processes and Pingora threads, default 1), WRK_THREADS (default 1), KEEP=1 keeps
# the work directory, PERF=1 profiles one extra run each of (c) and (d) with perf (compare mode;
# reports in PERF_DIR, default target/load-perf), IMPORT_JOBS (parallel `grants import` runs in
# scaling mode, default 1: concurrent imports into one store were once seen to fail with
# "FOREIGN KEY constraint failed").
#
# Loopback only (127.0.0.1), bounded in time, installs nothing. Every process it starts is stopped
# on exit, whatever the exit path. Timings are reported, never asserted: the script fails only when
# a configuration answered errors (non-2xx) or nothing at all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

MODE=${1:-compare}
case "$MODE" in
compare | scaling | callgrind | cpu | knobs) ;;
-h | --help)
  sed -n '2,/or nothing at all.$/p' "$0"
  exit 0
  ;;
*)
  echo "usage: bash benches/load.sh [compare|scaling|callgrind|cpu|knobs]" >&2
  exit 2
  ;;
esac
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-2}
  ROUNDS=${ROUNDS:-1}
fi
DURATION=${DURATION:-10}
case "$MODE" in
scaling) ROUNDS=${ROUNDS:-1} ;;
cpu | knobs) ROUNDS=${ROUNDS:-3} ;;
*) ROUNDS=${ROUNDS:-2} ;;
esac
CONNS=${CONNS:-32}
PACE_MS=${PACE_MS:-32}
WORKERS=${WORKERS:-1}
WRK_THREADS=${WRK_THREADS:-1}
# CPU placement: PIN=1 puts the configuration measured on the last CPU and the load generator,
# the upstream and the token endpoint on the others. Off by default: on this project's 2-vCPU
# VMs pinning made every hop of a request a wake-up of the other vCPU (an IPI to a halted vCPU,
# a VM exit), which raised nginx's CPU per request from 16 to 27 us and the paced p99 of every
# configuration to several ms. Unpinned, CPU per request of one unchanged configuration moves by
# up to a fifth between runs (how the kernel shares the cores changes how many requests each
# wake-up finds): compare within a run, over several rounds, and prefer `callgrind` counts.
NCPU=$(nproc)
PIN=${PIN:-0}
SUT=()
LOAD=()
if [ "$PIN" = 1 ]; then
  SUT=(taskset -c "$((NCPU - 1))")
  LOAD=(taskset -c "0-$((NCPU - 2))")
fi
KEY=${KEY:-load-bench-client-key-5c9a1f}
ORG=111111 # the organization the stand-in's demo grant serves
STATIC_BEARER="Bearer static-0123456789abcdef0123456789abcdef01234567"

# ---------------------------------------------------------------------------------------------
# Prerequisites.
missing=()
for tool in nginx wrk curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "load.sh: missing ${missing[*]}; install them with:" >&2
  echo "    apt-get install -y nginx-light wrk curl" >&2
  exit 1
fi

TARGET_DIR=${CARGO_TARGET_DIR:-target}
echo "== building release binaries"
cargo build --release --quiet --bin meraki-oauth-proxy --example passthrough --example meraki_standin \
  --example passthrough_jemalloc
PROXY_BIN="$TARGET_DIR/release/meraki-oauth-proxy"
PASS_BIN="$TARGET_DIR/release/examples/passthrough"
PASS_JEMALLOC_BIN="$TARGET_DIR/release/examples/passthrough_jemalloc"
STANDIN_BIN="$TARGET_DIR/release/examples/meraki_standin"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every process started is recorded and stopped on exit.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/meraki-load.XXXXXX")
PIDS=()
STARTED=()

stop_pid() {
  local pid=$1 i kids
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(pgrep -P "$pid" 2>/dev/null || true) # nginx workers
  # SIGINT: fast shutdown for Pingora (SIGTERM would wait out a grace period), nginx, the stand-in.
  kill -INT "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for k in $kids; do
    kill -0 "$k" 2>/dev/null && kill -KILL "$k" 2>/dev/null || true
  done
  return 0
}

cleanup() {
  local rc=$? pid left=()
  trap - EXIT INT TERM
  for pid in $(jobs -p) "${PIDS[@]}"; do stop_pid "$pid"; done
  sleep 0.2
  for pid in "${STARTED[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
  done
  if [ ${#left[@]} -gt 0 ]; then
    echo "load.sh: processes still running after cleanup: ${left[*]}" >&2
    rc=1
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "load.sh: work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn NAME CMD...: starts CMD in the background, output to $WORK/NAME.log; sets SPAWNED.
spawn() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  SPAWNED=$!
  PIDS+=("$SPAWNED")
  STARTED+=("$SPAWNED")
}

# stop PID: stops one process started by spawn, and forgets it.
stop() {
  local pid=$1 p keep=()
  # Record nginx-style children too, to check them at exit.
  STARTED+=($(pgrep -P "$pid" 2>/dev/null || true))
  stop_pid "$pid"
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports below Linux's ephemeral range, so tests binding port 0 elsewhere do not take them.
NEXT_PORT=$((20000 + (RANDOM % 1000) * 10))
pick_port() {
  while port_open "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
  PORT=$NEXT_PORT
  NEXT_PORT=$((NEXT_PORT + 1))
}

# wait_port PORT PID NAME: until PORT accepts connections (10 s), or fail if PID died.
wait_port() {
  local i
  for i in $(seq "${WAIT_TRIES:-100}"); do
    port_open "$1" && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "load.sh: $3 exited; its log:" >&2
      cat "$WORK/$3.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "load.sh: $3 does not listen on 127.0.0.1:$1; its log:" >&2
  cat "$WORK/$3.log" >&2 || true
  exit 1
}

# ---------------------------------------------------------------------------------------------
# nginx: each instance with its own prefix, pid file, temp paths and logs, in the foreground.
NGINX_USER=""
[ "$(id -u)" -eq 0 ] && NGINX_USER="user root;"

nginx_conf() { # nginx_conf NAME WORKERS HTTP_BLOCK
  local dir="$WORK/$1"
  mkdir -p "$dir/tmp" "$dir/logs"
  cat >"$dir/nginx.conf" <<EOF
$NGINX_USER
daemon off;
master_process on;
worker_processes $2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  # Long-lived client connections, as wrk and the proxies keep theirs (default: 1000 requests).
  keepalive_requests 1000000;
  keepalive_timeout 75s;
$3
}
EOF
}

start_nginx() { # start_nginx NAME PORT [PIN...]; sets SPAWNED
  local dir="$WORK/$1" name=$1 port=$2
  shift 2
  spawn "$name" "$@" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
  wait_port "$port" "$SPAWNED" "$name"
}

# A Meraki-like page of networks (~1.5 KB) with Meraki's pagination Link header.
networks_body() {
  local i sep="" out="["
  for i in 00 01 02 03 04 05; do
    out+="$sep{\"id\":\"L_6465000000000$i\",\"organizationId\":\"$ORG\",\"name\":\"Branch Office $i\",\"productTypes\":[\"appliance\",\"switch\",\"wireless\"],\"timeZone\":\"America/Los_Angeles\",\"tags\":[\"branch\",\"west\"],\"enrollmentString\":null,\"url\":\"https://n123.meraki.com/Branch-$i/n/abcd$i/manage/usage/list\",\"notes\":\"Additional description of the network\",\"isBoundToConfigTemplate\":false}"
    sep=","
  done
  printf '%s]' "$out"
}
BODY=$(networks_body)
LINK="<https://api.meraki.com/api/v1/organizations/$ORG/networks?perPage=6&startingAfter=a000000>; rel=first, <https://api.meraki.com/api/v1/organizations/$ORG/networks?perPage=6&startingAfter=L_646500000000005>; rel=next, <https://api.meraki.com/api/v1/organizations/$ORG/networks?perPage=6&endingBefore=zzzzzzz>; rel=last"

UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-1}
pick_port
UP_PORT=$PORT
nginx_conf upstream "$UPSTREAM_WORKERS" "
  server {
    listen 127.0.0.1:$UP_PORT;
    location ~ ^/api/v1/organizations/[0-9]+/networks\$ {
      default_type application/json;
      add_header X-Request-Id \$request_id always;
      add_header Link '$LINK' always;
      return 200 '$BODY';
    }
    location / {
      default_type application/json;
      return 404 '{\"errors\":[\"Not found\"]}';
    }
  }"

pick_port
NGINX_PORT=$PORT
nginx_conf nginx-proxy "$WORKERS" "
  upstream meraki {
    server 127.0.0.1:$UP_PORT;
    keepalive 128;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://meraki;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Cisco-Meraki-API-Key \"\";
      proxy_set_header Authorization \"$STATIC_BEARER\";
    }
  }"

echo "== starting the upstream (nginx, $UPSTREAM_WORKERS worker) and the token endpoint (stand-in)"
start_nginx upstream "$UP_PORT" "${LOAD[@]}"
UPSTREAM_PID=$SPAWNED
URL_PATH="/api/v1/organizations/$ORG/networks"
curl -fsS -o /dev/null "http://127.0.0.1:$UP_PORT$URL_PATH" || {
  echo "load.sh: the upstream does not answer 200" >&2
  exit 1
}

pick_port
STANDIN_PORT=$PORT
spawn standin "${LOAD[@]}" "$STANDIN_BIN" --listen "127.0.0.1:$STANDIN_PORT"
STANDIN_PID=$SPAWNED
for _ in $(seq 100); do
  grep -q '^refresh_token=' "$WORK/standin.log" && break
  kill -0 "$STANDIN_PID" 2>/dev/null || break
  sleep 0.1
done
standin_value() { sed -n "s/^$1=//p" "$WORK/standin.log" | head -n 1; }
TOKEN_URL=$(standin_value token_url)
AUTHORIZE_URL=$(standin_value authorize_url)
CLIENT_ID=$(standin_value client_id)
CLIENT_SECRET=$(standin_value client_secret)
DEMO_REFRESH=$(standin_value refresh_token)
if [ -z "$TOKEN_URL" ] || [ -z "$DEMO_REFRESH" ]; then
  echo "load.sh: the stand-in did not print its token URL and refresh token:" >&2
  cat "$WORK/standin.log" >&2
  exit 1
fi
export BENCH_CLIENT_SECRET="$CLIENT_SECRET"
# The key that encrypts tokens at rest (32 bytes, hex).
BENCH_STORE_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
export BENCH_STORE_KEY
KEY_SHA256=$(printf %s "$KEY" | "$PROXY_BIN" hash-key)

# ---------------------------------------------------------------------------------------------
# The proxy (d): one configuration directory per variant.

# [rate_limits] of the proxies: shaping on (as shipped) with limits no load here reaches, so the
# runs measure what shaping costs on the hot path, not Meraki's 10 requests/s. (e) turns it off.
RATE_LIMITS='organization_rps = 1000000
organization_burst = 1000000
source_rps = 10000000'

# proxy_config DIR CLIENTS ORGS_TOML: writes DIR/proxy.toml. CLIENTS-1 decoy clients (digests
# nobody's key has) and the benchmark client, last.
proxy_config() {
  local dir=$1 clients=$2 orgs=$3 i
  mkdir -p "$dir"
  pick_port
  PROXY_PORT=$PORT
  pick_port
  ADMIN_PORT=$PORT
  {
    cat <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
threads = $WORKERS

[upstream]
api_base = "http://127.0.0.1:$UP_PORT/api/v1"
token_url = "$TOKEN_URL"

[store]
path = "$dir/tokens.db"
key_env = "BENCH_STORE_KEY"

[audit]
path = "$dir/audit.jsonl"

[rate_limits]
$RATE_LIMITS

[[integrations]]
name = "bench"
client_id = "$CLIENT_ID"
client_secret_env = "BENCH_CLIENT_SECRET"

EOF
    for ((i = 1; i < clients; i++)); do
      printf '[[clients]]\nname = "decoy-%d"\nkey_sha256 = "%064x"\nintegration = "bench"\norganizations = ["%s"]\n\n' \
        "$i" "$i" "$ORG"
    done
    printf '[[clients]]\nname = "bench-client"\nkey_sha256 = "%s"\nintegration = "bench"\norganizations = [%s]\n' \
      "$KEY_SHA256" "$orgs"
  } >"$dir/proxy.toml"
}

# import_grant DIR ORG... < refresh token on stdin
import_grant() {
  local dir=$1 args=() o
  shift
  for o in "$@"; do args+=(--org "$o"); done
  "$PROXY_BIN" --config "$dir/proxy.toml" grants import --integration bench "${args[@]}" \
    --refresh-token-file - >>"$dir/import.log" 2>&1 || {
    echo "load.sh: grants import failed:" >&2
    cat "$dir/import.log" >&2
    exit 1
  }
}

# start_proxy DIR [PATH] [BINARY]: starts the proxy and checks PATH answers 200 with the key and 401
# without; sets PROXY_PID (PROXY_PORT/ADMIN_PORT come from proxy_config).
start_proxy() {
  local name check_path=${2:-$URL_PATH} bin=${3:-$PROXY_BIN}
  name="proxy-$(basename "$1")"
  spawn "$name" "${SUT[@]}" env RUST_LOG=warn "$bin" --config "$1/proxy.toml" run
  PROXY_PID=$SPAWNED
  wait_port "$PROXY_PORT" "$PROXY_PID" "$name"
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Cisco-Meraki-API-Key: $KEY" \
    "http://127.0.0.1:$PROXY_PORT$check_path")
  if [ "$code" != 200 ]; then
    echo "load.sh: the proxy answers $code, not 200; its log:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
  fi
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROXY_PORT$check_path")
  if [ "$code" != 401 ]; then
    echo "load.sh: the proxy answers $code without a key, not 401" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------------------------------------
# wrk.

# run_wrk OUT URL CONNS [LUA]: one measured run; output in OUT.
run_wrk() {
  local out=$1 url=$2 conns=$3 lua=${4:-} threads=$WRK_THREADS
  [ "$conns" -lt "$threads" ] && threads=$conns
  local args=(-t"$threads" -c"$conns" -d"${DURATION}s" --latency -H "X-Cisco-Meraki-API-Key: $KEY")
  [ -n "$lua" ] && args+=(-s "$lua")
  "${LOAD[@]}" wrk "${args[@]}" "$url" >"$out" 2>&1 || {
    echo "load.sh: wrk failed on $url:" >&2
    cat "$out" >&2
    exit 1
  }
}

# warm URL [LUA]: opens the connection pools, not measured.
warm() {
  local args=(-t1 -c"$CONNS" -d1s -H "X-Cisco-Meraki-API-Key: $KEY")
  [ -n "${2:-}" ] && args+=(-s "$2")
  "${LOAD[@]}" wrk "${args[@]}" "$1" >/dev/null 2>&1 || true
}

# parse_wrk FILE: "requests_per_s p50_ms p99_ms requests non2xx socket_errors"
parse_wrk() {
  awk '
    function ms(v) {
      if (v ~ /us$/) return v / 1000
      if (v ~ /ms$/) return v + 0
      if (v ~ /s$/) return v * 1000
      return v + 0
    }
    /Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }
    /Non-2xx or 3xx responses:/ { bad = $NF }
    /Socket errors:/ { gsub(/,/, ""); sock = $4 + $6 + $8 + $10 }
    END { printf "%.0f %.3f %.3f %d %d %d\n", rps, p50, p99, n, bad, sock }
  ' "$1"
}

FAILURES=()
# check FILE LABEL: records a failure when the run answered errors or nothing.
check() {
  local rps p50 p99 n bad sock
  read -r rps p50 p99 n bad sock < <(parse_wrk "$1")
  if [ "$n" -eq 0 ]; then
    FAILURES+=("$2: no responses")
  elif [ "$bad" -gt 0 ]; then
    FAILURES+=("$2: $bad non-2xx responses of $n")
  fi
  if [ "$sock" -gt 0 ]; then
    echo "   note: $2: socket errors: $(grep 'Socket errors' "$1" | sed 's/^ *//')"
  fi
}

median() { # median of the numbers on stdin
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# med LABEL FIELD: median of FIELD (1 rps, 2 p50, 3 p99) over the rounds of LABEL.
med() {
  local f
  for f in "$WORK"/results/"$1".*[0-9]; do parse_wrk "$f"; done | awk -v k="$2" '{ print $k }' | median
}

# cpu_ticks PID...: user + system CPU of the processes and their children (nginx workers), in
# clock ticks (see cpu_split). CPU per request is each configuration's own cost, whatever share of
# the 2 cores wrk and the upstream took during its run.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
  local u s
  read -r u s < <(cpu_split "$@")
  echo $((u + s))
}
# cpu_us FILE-PREFIX: median CPU microseconds per request over the rounds of FILE-PREFIX.
cpu_us() {
  local f n
  for f in "$WORK"/results/"$1".*[0-9]; do
    n=$(parse_wrk "$f" | awk '{ print $4 }')
    awk -v t="$(cat "$f.cpu")" -v n="$n" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f\n", (n > 0 ? t * 1e6 / hz / n : 0) }'
  done | median
}

hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

fail_if_any() {
  if [ ${#FAILURES[@]} -gt 0 ]; then
    echo
    echo "FAILED: a configuration answered errors or nothing:" >&2
    printf '  %s\n' "${FAILURES[@]}" >&2
    exit 1
  fi
}

mkdir -p "$WORK/results"

# =============================================================================================
compare() {
  echo "== starting (b) nginx proxy, (c) Pingora pass-through, (j) the same on jemalloc, (d) meraki-oauth-proxy, (e) the same with shaping off; $WORKERS worker(s) each"
  start_nginx_proxy
  start_pass c "(c) Pingora pass-through" "$PASS_BIN"
  start_pass j "(j) pass-through, jemalloc" "$PASS_JEMALLOC_BIN"
  # (e): the same proxy with [rate_limits] enabled = false. (d) last: its admin port and audit
  # log are read at the end.
  RATE_LIMITS='enabled = false' start_main_proxy e "(e) proxy, shaping off"
  start_main_proxy d "(d) meraki-oauth-proxy"
  CFG_URL[a]="http://127.0.0.1:$UP_PORT$URL_PATH"
  CFG_PID[a]=$UPSTREAM_PID
  CFG_NAME[a]="(a) upstream direct (nginx)"
  local dir="$WORK/proxy-d" nginx_pid=${CFG_PID[b]} pass_pid=${CFG_PID[c]} jem_pid=${CFG_PID[j]}
  local proxy_pid=${CFG_PID[d]}
  local -n url=CFG_URL pids=CFG_PID name=CFG_NAME
  # What each configuration answers, head and size, kept with the work directory (KEEP=1): a
  # difference in framing or headers would explain a difference in cost.
  for c in a b c j d e; do
    curl -sS -D "$WORK/headers-$c.txt" -o /dev/null -w 'body bytes: %{size_download}\n' \
      -H "X-Cisco-Meraki-API-Key: $KEY" "${url[$c]}" >>"$WORK/headers-$c.txt"
  done
  local c
  # rounds PREFIX [LUA]: ROUNDS rounds of every configuration in alternating order, each run's
  # wrk output in results/PREFIX$c.$r and the CPU it cost the configuration in results/...cpu.
  rounds() {
    local r c order t0 out
    for ((r = 1; r <= ROUNDS; r++)); do
      if ((r % 2)); then order="a b c j d e"; else order="e d j c b a"; fi
      for c in $order; do
        out="$WORK/results/$1$c.$r"
        t0=$(cpu_ticks ${pids[$c]})
        run_wrk "$out" "${url[$c]}" "$CONNS" "${2:-}"
        echo $(($(cpu_ticks ${pids[$c]}) - t0)) >"$out.cpu"
        check "$out" "${name[$c]} $1round $r"
        printf '   round %d %-30s %s\n' "$r" "${name[$c]}" "$(parse_wrk "$out" | awk '{ printf "%8d req/s  p50 %.3f ms  p99 %.3f ms", $1, $2, $3 }')"
      done
    done
  }
  # table PREFIX: the medians of every configuration.
  table() {
    local c
    printf '%-32s %12s %10s %10s %14s\n' "configuration" "requests/s" "p50 ms" "p99 ms" "CPU us/request"
    for c in a b c j d e; do
      printf '%-32s %12.0f %10.3f %10.3f %14.1f\n' "${name[$c]}" "$(med "$1$c" 1)" "$(med "$1$c" 2)" "$(med "$1$c" 3)" "$(cpu_us "$1$c")"
    done
  }

  for c in a b c j d e; do warm "${url[$c]}"; done
  echo "== measuring: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s, $ROUNDS round(s), order alternating"
  rounds ""

  # Latency below saturation. At full load every connection is always busy and a percentile is
  # mostly queueing (about CONNS / throughput); SPEC's "added p99 at 32 connections" is about
  # the proxy's own delay. Paced runs keep CONNS connections each pausing after a response
  # before the next request (wrk's Lua delay(), not counted in wrk's latency), for PACE_MS on
  # average: drawn uniformly from [0, 2 x PACE_MS] so the connections do not move in lockstep.
  printf 'function delay()\n  return math.random(0, %d)\nend\n' "$((2 * PACE_MS))" >"$WORK/paced.lua"
  echo "== paced: wrk -c$CONNS, each connection pausing ${PACE_MS} ms on average between requests (about $((CONNS * 1000 / PACE_MS)) req/s in all)"
  rounds paced- "$WORK/paced.lua"

  # One more run each of (c) and (d), profiled (PERF=1, FLAMEGRAPH=1); not part of the table.
  profile c d

  sleep 1 # the audit writer flushes in batches
  local audited forwarded
  audited=$(wc -l <"$dir/audit.jsonl" || echo 0)
  forwarded=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
    awk '/^meraki_proxy_requests_total\{/ && /status_class="2xx"/ { s += $NF } END { printf "%d", s }')

  echo
  echo "Results: median over $ROUNDS round(s); wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s; $WORKERS worker(s); loopback"
  table ""
  local rps_b rps_c rps_d p99_a p99_c p99_d
  rps_b=$(med b 1)
  rps_c=$(med c 1)
  rps_d=$(med d 1)
  p99_a=$(med a 3)
  p99_c=$(med c 3)
  p99_d=$(med d 3)
  echo
  awk -v d="$rps_d" -v b="$rps_b" -v c="$rps_c" 'BEGIN {
    printf "throughput (d)/(b) nginx:        %.2fx\n", (b > 0 ? d / b : 0)
    printf "throughput (d)/(c) pass-through: %.2fx   (bar: >= 0.9x)\n", (c > 0 ? d / c : 0)
    printf "throughput (c)/(b):              %.2fx\n", (b > 0 ? c / b : 0)
  }'
  awk -v c="$(cpu_us c)" -v d="$(cpu_us d)" -v b="$(cpu_us b)" -v j="$(cpu_us j)" 'BEGIN {
    printf "CPU per request (c)/(d):         %.2fx   (bar: >= 0.9x; the throughput ratio one core each would give)\n", (d > 0 ? c / d : 0)
    printf "CPU per request (j)/(d):         %.2fx   (both on jemalloc: the work of the proxy alone)\n", (d > 0 ? j / d : 0)
    printf "CPU per request (b)/(d):         %.2fx   (aim: >= 1.0x nginx)\n", (d > 0 ? b / d : 0)
    printf "CPU per request (b)/(c):         %.2fx   (bare Pingora against nginx)\n", (c > 0 ? b / c : 0)
    printf "CPU per request (b)/(j):         %.2fx   (bare Pingora on jemalloc against nginx)\n", (j > 0 ? b / j : 0)
  }'
  awk -v a="$p99_a" -v c="$p99_c" -v d="$p99_d" 'BEGIN {
    printf "saturated p99 (d) - (a):         %.3f ms (queueing: about CONNS / throughput)\n", d - a
    printf "saturated p99 (d) - (c):         %.3f ms\n", d - c
  }'
  awk -v d="$rps_d" -v e="$(med e 1)" -v cd="$(cpu_us d)" -v ce="$(cpu_us e)" 'BEGIN {
    printf "shaping on/off: throughput (d)/(e) %.2fx; CPU per request (d) - (e) %.1f us\n", (e > 0 ? d / e : 0), cd - ce
  }'
  echo
  echo "Paced: $CONNS connections, ${PACE_MS} ms mean pause per connection between requests; median over $ROUNDS round(s)"
  table paced-
  awk -v a="$(med paced-a 3)" -v c="$(med paced-c 3)" -v d="$(med paced-d 3)" 'BEGIN {
    printf "added p99 (d) - (a) upstream:    %.3f ms (bar: < 1 ms; a difference of percentiles)\n", d - a
    printf "added p99 (d) - (c) pass-through: %.3f ms\n", d - c
  }'
  echo
  printf 'peak RSS (VmHWM) (d) proxy:      %s MiB (bar: < 50 MiB); now %s MiB\n' \
    "$(mib "$(hwm_kib "$proxy_pid")")" "$(mib "$(rss_kib "$proxy_pid")")"
  printf 'peak RSS (VmHWM) (c) pass-through: %s MiB; (j) on jemalloc: %s MiB; (b) nginx worker: %s MiB\n' \
    "$(mib "$(hwm_kib "$pass_pid")")" "$(mib "$(hwm_kib "$jem_pid")")" "$(mib "$(hwm_kib "$(pgrep -P "$nginx_pid" | head -n 1)")")"
  echo "audit records written by (d): $audited; 2xx responses in its metrics: $forwarded (both include warm-up)"
  fail_if_any
}

# =============================================================================================
# scaling: (d) under more connections, more clients, more grants; (c) alongside for connections.
scaling() {
  local sdir="$WORK/scaling"
  mkdir -p "$sdir"
  pick_port
  local pass_port=$PORT
  spawn passthrough "${SUT[@]}" "$PASS_BIN" "127.0.0.1:$pass_port" "127.0.0.1:$UP_PORT" "$WORKERS"
  local pass_pid=$SPAWNED
  wait_port "$pass_port" "$pass_pid" passthrough

  # Refresh tokens: the demo grant for org 111111, and a grant per org for 1,000 orgs, minted
  # through the stand-in's (auto-approving) authorization code flow.
  local refresh=$DEMO_REFRESH
  local n_grants=1000 i org code loc rt
  local grant_orgs=()
  echo "== minting $n_grants grants through the stand-in's authorization code flow"
  : >"$sdir/tokens"
  for ((i = 1; i <= n_grants; i++)); do
    org=$((300000 + i))
    grant_orgs+=("$org")
    loc=$(curl -s -o /dev/null -w '%{redirect_url}' \
      "$AUTHORIZE_URL?client_id=$CLIENT_ID&response_type=code&redirect_uri=http://127.0.0.1/cb&scope=dashboard:general:config:read&org_ids=$org")
    code=$(printf %s "$loc" | sed -n 's/.*[?&]code=\([^&]*\).*/\1/p')
    rt=$(curl -s -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=authorization_code -d "code=$code" \
      --data-urlencode redirect_uri=http://127.0.0.1/cb "$TOKEN_URL" |
      sed -n 's/.*"refresh_token" *: *"\([^"]*\)".*/\1/p')
    if [ -z "$rt" ]; then
      echo "load.sh: could not mint a grant for org $org (authorize answered $loc)" >&2
      exit 1
    fi
    printf '%s %s\n' "$org" "$rt" >>"$sdir/tokens"
  done

  # Variants: name clients orgs-of-the-client
  local orgs_1000
  orgs_1000=$(printf '"%s",' "${grant_orgs[@]}")
  orgs_1000=${orgs_1000%,}

  # wrk scripts: one organization, or round-robin over the 1,000.
  printf 'local paths = {"%s"}\nlocal i = 0\nrequest = function()\n  i = i %% #paths + 1\n  return wrk.format(nil, paths[i])\nend\n' \
    "$URL_PATH" >"$sdir/one.lua"
  {
    printf 'local paths = {'
    printf '"/api/v1/organizations/%s/networks",' "${grant_orgs[@]}"
    printf '}\nlocal i = 0\nrequest = function()\n  i = i %% #paths + 1\n  return wrk.format(nil, paths[i])\nend\n'
  } >"$sdir/many.lua"

  : >"$sdir/rows"
  row() { # row LABEL RESULT-PREFIX
    local f rps p50 p99
    rps=$(med "$2" 1)
    p50=$(med "$2" 2)
    p99=$(med "$2" 3)
    printf '%-50s %12.0f %10.3f %10.3f\n' "$1" "$rps" "$p50" "$p99" >>"$sdir/rows"
  }
  measure() { # measure PREFIX URL CONNS [LUA]
    local r
    for ((r = 1; r <= ROUNDS; r++)); do
      run_wrk "$WORK/results/$1.$r" "$2" "$3" "${4:-}"
      check "$WORK/results/$1.$r" "$1 round $r"
      printf '   %-28s %s\n' "$1" "$(parse_wrk "$WORK/results/$1.$r" | awk '{ printf "%8d req/s  p50 %.3f ms  p99 %.3f ms", $1, $2, $3 }')"
    done
  }

  local hwm=()
  # 1) connections: 10 clients, 1 grant.
  local dir="$sdir/clients-10"
  proxy_config "$dir" 10 "\"$ORG\""
  printf %s "$refresh" | import_grant "$dir" "$ORG"
  start_proxy "$dir"
  echo "== connections (10 clients, 1 grant)"
  warm "http://127.0.0.1:$PROXY_PORT$URL_PATH"
  warm "http://127.0.0.1:$pass_port$URL_PATH"
  local conns
  for conns in 1 32 256; do
    measure "c-conns-$conns" "http://127.0.0.1:$pass_port$URL_PATH" "$conns"
    measure "d-conns-$conns" "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$conns"
    row "(c) pass-through, $conns connections" "c-conns-$conns"
    row "(d) proxy, $conns connections" "d-conns-$conns"
  done
  echo "== clients: 10 (this proxy) then 10,000"
  measure "d-clients-10" "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$CONNS"
  row "(d) proxy, 10 clients, $CONNS connections" d-clients-10
  echo "== grants: 1 (this proxy)"
  measure "d-grants-1" "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$CONNS" "$sdir/one.lua"
  row "(d) proxy, 1 grant, $CONNS conns (wrk Lua)" d-grants-1
  hwm+=("10 clients/1 grant: $(mib "$(hwm_kib "$PROXY_PID")") MiB")
  # The grant's refresh token rotated at import: the next proxy needs the current one. The
  # store file is copied instead (same integration, same organization).
  stop "$PROXY_PID"

  # 2) 10,000 clients: the same grant store, copied.
  local store_src="$dir/tokens.db"
  dir="$sdir/clients-10000"
  proxy_config "$dir" 10000 "\"$ORG\""
  cp "$store_src" "$dir/tokens.db"
  [ -e "$store_src-wal" ] && cp "$store_src-wal" "$dir/tokens.db-wal"
  start_proxy "$dir"
  warm "http://127.0.0.1:$PROXY_PORT$URL_PATH"
  measure "d-clients-10000" "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$CONNS"
  row "(d) proxy, 10,000 clients, $CONNS connections" d-clients-10000
  hwm+=("10,000 clients: $(mib "$(hwm_kib "$PROXY_PID")") MiB")
  stop "$PROXY_PID"

  # 3) 1,000 grants: one client on 1,000 organizations, a grant per organization.
  dir="$sdir/grants-1000"
  proxy_config "$dir" 10 "$orgs_1000"
  local jobs=${IMPORT_JOBS:-1} running=0 t0=$SECONDS
  echo "== importing $n_grants grants (grants import, one process each, $jobs at a time)"
  while read -r org rt; do
    printf %s "$rt" | import_grant "$dir" "$org" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
      wait -n || exit 1
      running=$((running - 1))
    fi
  done <"$sdir/tokens"
  while [ "$running" -gt 0 ]; do
    wait -n || exit 1
    running=$((running - 1))
  done
  echo "   imported in $((SECONDS - t0)) s"
  start_proxy "$dir" "/api/v1/organizations/${grant_orgs[0]}/networks"
  warm "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$sdir/many.lua"
  measure "d-grants-1000" "http://127.0.0.1:$PROXY_PORT$URL_PATH" "$CONNS" "$sdir/many.lua"
  row "(d) proxy, 1,000 grants, $CONNS conns (wrk Lua)" d-grants-1000
  hwm+=("1,000 grants: $(mib "$(hwm_kib "$PROXY_PID")") MiB")
  stop "$PROXY_PID"

  echo
  echo "Scaling: median over $ROUNDS round(s); wrk -t$WRK_THREADS -d${DURATION}s; $WORKERS worker(s); loopback"
  printf '%-50s %12s %10s %10s\n' "configuration" "requests/s" "p50 ms" "p99 ms"
  cat "$sdir/rows"
  echo "peak RSS (VmHWM) of (d): ${hwm[*]}"
  fail_if_any
}

# =============================================================================================
# callgrind: the user-space instructions per request of (c) the pass-through and (d) the proxy,
# the proxy's split by layer (inclusive counts of its hooks and threads). Valgrind serializes
# threads and counts instructions, so the figures do not depend on what else the machine runs;
# the kernel's share (syscalls, TCP) is not counted.
callgrind() {
  command -v valgrind >/dev/null 2>&1 || {
    echo "load.sh: callgrind mode needs valgrind (apt-get install -y valgrind)" >&2
    exit 1
  }
  local n=${CG_REQUESTS:-2000} vg=(valgrind --tool=callgrind --instr-atstart=no --separate-threads=no)
  # One keep-alive connection, N sequential GETs: prints how many answered 200.
  cat >"$WORK/client.py" <<'PY'
import http.client, sys
port, path, n, key = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
ok = 0
for _ in range(n):
    c.request("GET", path, headers={"X-Cisco-Meraki-API-Key": key} if key else {})
    r = c.getresponse()
    r.read()
    ok += r.status == 200
print(ok)
PY
  pick_port
  local pass_port=$PORT
  spawn passthrough "${vg[@]}" --callgrind-out-file="$WORK/cg-c.out" \
    "$PASS_BIN" "127.0.0.1:$pass_port" "127.0.0.1:$UP_PORT" 1
  local pass_pid=$SPAWNED
  WAIT_TRIES=600 wait_port "$pass_port" "$pass_pid" passthrough
  pick_port
  local jem_port=$PORT
  spawn passthrough-jemalloc "${vg[@]}" --callgrind-out-file="$WORK/cg-j.out" \
    "$PASS_JEMALLOC_BIN" "127.0.0.1:$jem_port" "127.0.0.1:$UP_PORT" 1
  local jem_pid=$SPAWNED
  WAIT_TRIES=600 wait_port "$jem_port" "$jem_pid" passthrough-jemalloc
  local dir="$WORK/proxy-cg"
  WORKERS=1 proxy_config "$dir" 1 "\"$ORG\""
  printf %s "$DEMO_REFRESH" | import_grant "$dir" "$ORG"
  spawn proxy-cg env RUST_LOG=warn "${vg[@]}" --callgrind-out-file="$WORK/cg-d.out" \
    "$PROXY_BIN" --config "$dir/proxy.toml" run
  local proxy_pid=$SPAWNED
  WAIT_TRIES=600 wait_port "$PROXY_PORT" "$proxy_pid" proxy-cg
  local c pid port key ok
  for c in c j d; do
    case $c in
    c) pid=$pass_pid port=$pass_port key="" ;;
    j) pid=$jem_pid port=$jem_port key="" ;;
    d) pid=$proxy_pid port=$PROXY_PORT key=$KEY ;;
    esac
    python3 "$WORK/client.py" "$port" "$URL_PATH" 200 "$key" >/dev/null # warm-up, not counted
    callgrind_control -i on "$pid" >/dev/null
    ok=$(python3 "$WORK/client.py" "$port" "$URL_PATH" "$n" "$key")
    sleep 1 # the audit writer's batch
    callgrind_control -i off "$pid" >/dev/null
    callgrind_control -d "$pid" >/dev/null
    [ "$ok" = "$n" ] || FAILURES+=("($c) answered $ok of $n requests 200")
  done
  # The dumps (callgrind_control -d writes FILE.1; the file without a suffix is the exit's).
  for c in c j d; do
    callgrind_annotate --inclusive=yes --threshold=100 "$WORK/cg-$c.out.1" 2>/dev/null >"$WORK/cg-$c.txt"
    cp "$WORK/cg-$c.txt" "$TARGET_DIR/callgrind-$c.txt"
  done
  # inclusive FILE PATTERN: the largest inclusive count of a function matching PATTERN, per request.
  inclusive() {
    awk -v n="$n" -v pat="$2" '
      /^ *[0-9,]+ \([ 0-9.]+%\)  / && $0 ~ pat && $0 !~ /=>/ { v = $1; gsub(",", "", v); if (v + 0 > best) best = v + 0 }
      END { printf "%.0f", best / n }' "$1"
  }
  local ic ij id sha
  ic=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$WORK/cg-c.txt")
  ij=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$WORK/cg-j.txt")
  id=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$WORK/cg-d.txt")
  sha=$(inclusive "$WORK/cg-d.txt" 'sha2::sha256::compress256( \\[[^]]*\\])? *$')
  echo
  echo "Instructions per request (callgrind, user space only; $n sequential requests on one keep-alive connection)"
  awk -v c="$ic" -v j="$ij" -v d="$id" -v n="$n" -v sha="$sha" 'BEGIN {
    printf "(c) Pingora pass-through                          %8.0f\n", c / n
    printf "(j) the same on jemalloc                          %8.0f\n", j / n
    printf "(d) meraki-oauth-proxy                            %8.0f\n", d / n
    printf "    of which SHA-256 (software under valgrind, SHA-NI natively) %8.0f\n", sha
    printf "(c)/(d)                                           %8.2fx\n", (d > 0 ? c / d : 0)
    printf "(c)/(d) leaving SHA-256 out                       %8.2fx\n", (d > 0 ? c / (d - sha * n) : 0)
    printf "(j)/(d) leaving SHA-256 out                       %8.2fx\n", (d > 0 ? j / (d - sha * n) : 0)
  }'
  echo
  echo "(d) by layer: inclusive instructions per request (indented rows are part of the row above)"
  local layer pattern
  while IFS='|' read -r layer pattern; do
    printf '  %-52s %8s\n' "$layer" "$(inclusive "$WORK/cg-d.txt" "$pattern")"
  done <<'LAYERS'
request_filter (identity, admission, route, shaping, token)|ProxyHttp>::request_filter::\{\{closure\}\}( \\[[^]]*\\])? *$
  identity: key digest and lookup|identity::Identities::by_key( \\[[^]]*\\])? *$
  route: path parse|route::path::parse( \\[[^]]*\\])? *$
upstream_request_filter (bearer, Host, path)|ProxyHttp>::upstream_request_filter::\{\{closure\}\}( \\[[^]]*\\])? *$
upstream_response_filter (answer, Link, request id)|ProxyHttp>::upstream_response_filter::\{\{closure\}\}( \\[[^]]*\\])? *$
  Link rewrite|forward::rewrite_link_to( \\[[^]]*\\])? *$
Pingora's per-I/O timeouts: making each timer (read, write, idle)|FastOrTokioTimeout as pingora_timeout::ToTimeout>::timeout( \\[[^]]*\\])? *$
logging (metrics, activity, audit entry)|ProxyHttp>::logging::\{\{closure\}\}( \\[[^]]*\\])? *$
audit writer thread (JSON, hash chain, write)|audit::writer::Writer::run( \\[[^]]*\\])? *$
  hash chain (SHA-256 of each record)|audit::chain::Position::frame( \\[[^]]*\\])? *$
allocator: malloc|_rjem_malloc( \\[[^]]*\\])? *$
allocator: free|_rjem_sdallocx( \\[[^]]*\\])? *$
allocator: realloc|_rjem_realloc( \\[[^]]*\\])? *$
the whole connection task (Pingora's path and the hooks)|connections::Gate<A> as pingora_core::apps::ServerApp>::process_new::\{\{closure\}\}( \\[[^]]*\\])? *$
LAYERS
  echo "  (the pass-through's whole connection task: $(inclusive "$WORK/cg-c.txt" 'process_new::\{\{closure\}\}( \\[[^]]*\\])? *$'); on jemalloc: $(inclusive "$WORK/cg-j.txt" 'process_new::\{\{closure\}\}( \\[[^]]*\\])? *$'))"
  echo "  full reports: $TARGET_DIR/callgrind-{c,j,d}.txt"
  fail_if_any
}

# =============================================================================================
# cpu_rounds CONFIG...: ROUNDS rounds of saturating load on each configuration (CFG_URL[c], CFG_PID[c],
# CFG_NAME[c]), in alternating order, then the table of requests/s and CPU per request (user and
# system apart) of each; `profile` of each with PERF=1 or FLAMEGRAPH=1.
declare -A CFG_URL CFG_PID CFG_NAME
cpu_rounds() {
  local configs=("$@") c r order out u0 s0 u1 s1 w0
  for c in "${configs[@]}"; do warm "${CFG_URL[$c]}"; done
  echo "== CPU per request: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s, $ROUNDS round(s), order alternating"
  for ((r = 1; r <= ROUNDS; r++)); do
    order=("${configs[@]}")
    ((r % 2)) || order=($(printf '%s\n' "${configs[@]}" | tac))
    for c in "${order[@]}"; do
      out="$WORK/results/cpu-$c.$r"
      read -r u0 s0 < <(cpu_split "${CFG_PID[$c]}")
      w0=$(switches "${CFG_PID[$c]}")
      run_wrk "$out" "${CFG_URL[$c]}" "$CONNS"
      read -r u1 s1 < <(cpu_split "${CFG_PID[$c]}")
      echo "$((u1 - u0)) $((s1 - s0)) $(($(switches "${CFG_PID[$c]}") - w0))" >"$out.us"
      check "$out" "${CFG_NAME[$c]} round $r"
    done
  done
  profile "${configs[@]}"
  echo
  echo "CPU by thread since start (name: user/system ticks, context switches, threads)"
  for c in "${configs[@]}"; do
    printf '  %s:' "${CFG_NAME[$c]}"
    for t in /proc/"${CFG_PID[$c]}"/task/*; do
      awk '{ n = $0; sub(/^[^(]*\(/, "", n); sub(/\) .*/, "", n); gsub(/ /, "_", n)
             rest = $0; sub(/^.*\) /, "", rest); split(rest, v, " "); printf "%s %d %d ", n, v[12], v[13] }' "$t/stat"
      awk '/ctxt_switches:/ { s += $2 } END { print s }' "$t/status"
    done | awk '{ u[$1] += $2; s[$1] += $3; w[$1] += $4; k[$1]++ } END { for (n in u) printf "  %s %d/%d %d (%d)", n, u[n], s[n], w[n], k[n]; printf "\n" }'
  done
  echo
  echo "CPU per request (median over $ROUNDS round(s); wrk -c$CONNS -d${DURATION}s; $WORKERS worker(s))"
  printf '%-40s %12s %10s %10s %10s %12s\n' configuration requests/s "user us" "sys us" "total us" "switches"
  for c in "${configs[@]}"; do
    printf '%-40s %12.0f %10s %10s %10s %12s\n' "${CFG_NAME[$c]}" "$(med "cpu-$c" 1)" "$(per_req "$c" 1)" "$(per_req "$c" 2)" "$(per_req "$c" 3)" "$(per_req "$c" 4)"
  done
}

# profile CONFIG...: with PERF=1, a flat profile (no call graph: cheap, native costs) of one more
# saturating run of each configuration; with FLAMEGRAPH=1, call graphs (DWARF), inclusive shares
# per function, and a flame graph with inferno when installed (`cargo install inferno`). Reports in
# PERF_DIR (default target/load-perf).
profile() {
  [ "${PERF:-0}" = 1 ] || [ "${FLAMEGRAPH:-0}" = 1 ] || return 0
  local configs=("$@") c
  local perf_dir=${PERF_DIR:-$TARGET_DIR/load-perf} perf_pid graph=()
  [ "${FLAMEGRAPH:-0}" = 1 ] && graph=(--call-graph dwarf,16384)
  mkdir -p "$perf_dir"
  for c in "${configs[@]}"; do
    perf record -q -F "${PERF_FREQ:-499}" "${graph[@]}" -p "${CFG_PID[$c]}" -o "$perf_dir/perf-$c.data" \
      -- sleep "$DURATION" >"$WORK/perf-$c.log" 2>&1 &
    perf_pid=$!
    STARTED+=("$perf_pid")
    run_wrk "$WORK/perf-$c.wrk" "${CFG_URL[$c]}" "$CONNS"
    wait "$perf_pid" || true
    perf report -i "$perf_dir/perf-$c.data" --no-children --stdio --sort dso,symbol -g none 2>/dev/null |
      grep -v '^#' | grep '%' | sed 's/  */ /g' | head -n 80 >"$perf_dir/flat-$c.txt" || true
    echo "   flat profile of ${CFG_NAME[$c]}: $perf_dir/flat-$c.txt"
    if [ "${FLAMEGRAPH:-0}" = 1 ]; then
      perf report -i "$perf_dir/perf-$c.data" --children --stdio --sort symbol -g none 2>/dev/null |
        grep -v '^#' | grep '%' | sed 's/  */ /g' | head -n 200 >"$perf_dir/inclusive-$c.txt" || true
      echo "   inclusive shares: $perf_dir/inclusive-$c.txt"
      if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
        perf script -i "$perf_dir/perf-$c.data" 2>/dev/null | inferno-collapse-perf |
          inferno-flamegraph --title "${CFG_NAME[$c]}" >"$perf_dir/flame-$c.svg" || true
        echo "   flame graph: $perf_dir/flame-$c.svg"
      else
        echo "   (no flame graph: cargo install inferno)"
      fi
    fi
  done
}

# cpu_split PID...: user and system CPU ticks of the processes and their children (nginx workers).
cpu_split() {
  local p u=0 s=0 a b
  for p in "$@" $(for p in "$@"; do pgrep -P "$p" 2>/dev/null || true; done); do
    read -r a b < <(awk '{ print $14, $15 }' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    u=$((u + a))
    s=$((s + b))
  done
  echo "$u $s"
}

# switches PID: context switches (voluntary and not) of all the process's threads so far.
switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches:/ { s += $2 } END { printf "%d", s }'
}

# per_req CONFIG FIELD: median over the rounds of FIELD (1 user, 2 system, 3 both: us/request; 4
# context switches per request).
per_req() {
  local f n
  for f in "$WORK"/results/cpu-"$1".*[0-9]; do
    n=$(parse_wrk "$f" | awk '{ print $4 }')
    awk -v n="$n" -v k="$2" -v hz="$CLK_TCK" '{
      if (k == 4) { printf "%.3f\n", (n > 0 ? $3 / n : 0); next }
      t = (k == 3 ? $1 + $2 : $k); printf "%.2f\n", (n > 0 ? t * 1e6 / hz / n : 0) }' "$f.us"
  done | median
}

# start_nginx_proxy: (b), nginx injecting the static bearer.
start_nginx_proxy() {
  start_nginx nginx-proxy "$NGINX_PORT" "${SUT[@]}"
  CFG_URL[b]="http://127.0.0.1:$NGINX_PORT$URL_PATH"
  CFG_PID[b]=$SPAWNED
  CFG_NAME[b]="(b) nginx + static bearer"
}

# start_pass KEY NAME BINARY [ENV...]: a pass-through (c) variant.
start_pass() {
  local key=$1 label=$2 bin=$3
  shift 3
  pick_port
  spawn "pass-$key" "${SUT[@]}" env "$@" "$bin" "127.0.0.1:$PORT" "127.0.0.1:$UP_PORT" "$WORKERS"
  wait_port "$PORT" "$SPAWNED" "pass-$key"
  CFG_URL[$key]="http://127.0.0.1:$PORT$URL_PATH"
  CFG_PID[$key]=$SPAWNED
  CFG_NAME[$key]=$label
}

# start_main_proxy KEY NAME [BINARY]: a proxy (d) on a copy of the first one's store.
start_main_proxy() {
  local key=$1 label=$2 bin=${3:-$PROXY_BIN} dir="$WORK/proxy-$1"
  proxy_config "$dir" 1 "\"$ORG\""
  if [ -z "${FIRST_STORE:-}" ]; then
    printf %s "$DEMO_REFRESH" | import_grant "$dir" "$ORG"
    FIRST_STORE=$dir
  else
    cp "$FIRST_STORE/tokens.db" "$dir/tokens.db"
    [ -e "$FIRST_STORE/tokens.db-wal" ] && cp "$FIRST_STORE/tokens.db-wal" "$dir/tokens.db-wal"
  fi
  start_proxy "$dir" "$URL_PATH" "$bin"
  CFG_URL[$key]="http://127.0.0.1:$PROXY_PORT$URL_PATH"
  CFG_PID[$key]=$PROXY_PID
  CFG_NAME[$key]=$label
}

# =============================================================================================
# cpu: CPU per request of (c), (j) and (d) at saturation, and of (d0) and (d1), other builds of the
# proxy, when BASELINE_BIN and BASELINE2_BIN name them: a before/after from one run, in minutes.
cpu() {
  local configs=(c j d)
  start_pass c "(c) Pingora pass-through" "$PASS_BIN"
  start_pass j "(j) pass-through on jemalloc" "$PASS_JEMALLOC_BIN"
  start_main_proxy d "(d) meraki-oauth-proxy"
  if [ -n "${BASELINE_BIN:-}" ]; then
    start_main_proxy d0 "(d0) baseline build" "$BASELINE_BIN"
    configs+=(d0)
  fi
  if [ -n "${BASELINE2_BIN:-}" ]; then
    start_main_proxy d1 "(d1) second baseline build" "$BASELINE2_BIN"
    configs+=(d1)
  fi
  cpu_rounds "${configs[@]}"
  awk -v c="$(per_req c 3)" -v d="$(per_req d 3)" -v cu="$(per_req c 1)" -v du="$(per_req d 1)" 'BEGIN {
    printf "CPU per request (c)/(d):         %.2fx   (bar: >= 0.9x)\n", (d > 0 ? c / d : 0)
    printf "user CPU per request (c)/(d):    %.2fx\n", (du > 0 ? cu / du : 0)
  }'
  if [ -n "${BASELINE_BIN:-}" ]; then
    awk -v c="$(per_req c 3)" -v d0="$(per_req d0 3)" -v d="$(per_req d 3)" 'BEGIN {
      printf "CPU per request (c)/(d0):        %.2fx   (the baseline build)\n", (d0 > 0 ? c / d0 : 0)
      printf "(d) - (d0):                      %+.2f us per request\n", d - d0
    }'
  fi
  if [ -n "${BASELINE2_BIN:-}" ]; then
    awk -v c="$(per_req c 3)" -v d1="$(per_req d1 3)" -v d="$(per_req d 3)" 'BEGIN {
      printf "CPU per request (c)/(d1):        %.2fx   (the second baseline build)\n", (d1 > 0 ? c / d1 : 0)
      printf "(d) - (d1):                      %+.2f us per request\n", d - d1
    }'
  fi
  fail_if_any
}

# =============================================================================================
# knobs: Pingora's knobs one by one on the bare pass-through, against (b) nginx injecting a static
# header: the work stealing runtime or one runtime per thread, the upstream keep-alive pool, accept
# tasks, the allocator; and the proxy (d) beside them.
knobs() {
  start_nginx_proxy
  start_pass c "(c) pass-through, Pingora defaults" "$PASS_BIN"
  start_pass c-nosteal "(c) work_stealing = false" "$PASS_BIN" PASSTHROUGH_WORK_STEALING=false
  start_pass c-pool "(c) upstream pool 1024 (128)" "$PASS_BIN" PASSTHROUGH_POOL=1024
  start_pass c-accept "(c) listener tasks 2 (1)" "$PASS_BIN" PASSTHROUGH_LISTENER_TASKS=2
  start_pass c-jemalloc "(c) jemalloc (glibc)" "$PASS_JEMALLOC_BIN"
  start_pass c-best "(c) jemalloc, work_stealing = false" "$PASS_JEMALLOC_BIN" PASSTHROUGH_WORK_STEALING=false
  start_main_proxy d "(d) meraki-oauth-proxy"
  # KNOBS="c c-accept": only these (and (b)), for more rounds of one comparison.
  local picked=(${KNOBS:-c c-nosteal c-pool c-accept c-jemalloc c-best d})
  cpu_rounds b "${picked[@]}"
  echo
  local c
  for c in "${picked[@]}"; do
    awk -v b="$(per_req b 3)" -v x="$(per_req "$c" 3)" -v rb="$(med cpu-b 1)" -v rx="$(med "cpu-$c" 1)" -v n="${CFG_NAME[$c]}" 'BEGIN {
      printf "%-40s CPU per request (b)/(x) %.2fx; throughput (x)/(b) %.2fx\n", n, (x > 0 ? b / x : 0), (rb > 0 ? rx / rb : 0)
    }'
  done
  fail_if_any
}
"$MODE"
