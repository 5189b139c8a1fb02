#!/usr/bin/env bash
# Goodput of scripts using the official Meraki SDK against an upstream enforcing Meraki's
# per-organization limit (the stand-in: 10 requests/s, 10 deep, 429 + Retry-After beyond), with
# N scripts (processes) on one organization, each with its own smart flow (9 requests/s, x0.7 on
# a 429): directly, and through the proxy (shaping at Meraki's figures, the default). Reports
# calls completed per second, the 429s Meraki served, failed calls, and the p50/p99 duration of
# a call (waits and retries included). Issue 15's "Measured".
#
#   bash benches/sdk_goodput.sh          # N = 1, 3, 10; 20 s per run
#   QUICK=1 bash benches/sdk_goodput.sh  # CI: N = 1, 3; 5 s per run
#
# Settings (environment): DURATION (s per run), COUNTS (e.g. "1 3 10"), MERAKI_SDK_PYTHON (the
# interpreter with the pinned SDK; default: scripts/python-env.sh's), KEEP=1 keeps the work
# directory. Each run gets a fresh stand-in and a fresh proxy, so its counts are its own.
# Loopback only, bounded in time; every process started is stopped on exit. Figures are
# reported, never asserted: the script fails only when something did not start.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-5}
  COUNTS=${COUNTS:-"1 3"}
fi
DURATION=${DURATION:-20}
COUNTS=${COUNTS:-"1 3 10"}
ORG=111111 # the stand-in's demo organization
KEY=sdk-goodput-bench-key-1f9e
PY=${MERAKI_SDK_PYTHON:-$(bash scripts/python-env.sh | tail -n 1)}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

echo "== building release binaries"
cargo build --release --quiet --bin meraki-oauth-proxy --example meraki_standin
PROXY_BIN="$TARGET_DIR/release/meraki-oauth-proxy"
STANDIN_BIN="$TARGET_DIR/release/examples/meraki_standin"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meraki-sdk-goodput.XXXXXX")
PIDS=()
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -INT "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "sdk_goodput.sh: work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the kernel's ephemeral range (32768-60999): no outgoing connection holds these.
NEXT_PORT=$((20000 + (RANDOM % 1000) * 10))
pick_port() {
  while port_open "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
  PORT=$NEXT_PORT
  NEXT_PORT=$((NEXT_PORT + 1))
}
wait_port() { # wait_port PORT PID LOG
  local i
  for i in $(seq 100); do
    port_open "$1" && return 0
    kill -0 "$2" 2>/dev/null || { cat "$3" >&2; exit 1; }
    sleep 0.1
  done
  cat "$3" >&2
  exit 1
}

export BENCH_STORE_KEY
BENCH_STORE_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
KEY_SHA256=$(printf %s "$KEY" | "$PROXY_BIN" hash-key)

# run MODE N: one measured run; appends a row to $WORK/rows.
run() {
  local mode=$1 n=$2 dir="$WORK/$1-$2"
  mkdir -p "$dir"
  pick_port
  local sport=$PORT
  "$STANDIN_BIN" --listen "127.0.0.1:$sport" --enforce-rate-limit 10,10 >"$dir/standin.log" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  wait_port "$sport" "$spid" "$dir/standin.log"
  for _ in $(seq 50); do grep -q '^refresh_token=' "$dir/standin.log" && break; sleep 0.1; done
  val() { sed -n "s/^$1=//p" "$dir/standin.log" | head -n 1; }
  local api token_url cid secret refresh base key
  api=$(val api_base)
  token_url=$(val token_url)
  cid=$(val client_id)
  secret=$(val client_secret)
  refresh=$(val refresh_token)
  if [ "$mode" = direct ]; then
    # The SDK sends its key as a bearer: an access token of the grant is what it needs.
    key=$(curl -fsS -u "$cid:$secret" -d grant_type=refresh_token -d "refresh_token=$refresh" "$token_url" |
      sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
    base=$api
  else
    pick_port
    local pport=$PORT
    pick_port
    local aport=$PORT
    cat >"$dir/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$pport"
admin_listen = "127.0.0.1:$aport"
threads = 2
[upstream]
api_base = "$api"
token_url = "$token_url"
[store]
path = "$dir/tokens.db"
key_env = "BENCH_STORE_KEY"
[audit]
path = "$dir/audit.jsonl"
[rate_limits]
# Meraki's published figures (the defaults, spelled out).
organization_rps = 10
organization_burst = 10
[[integrations]]
name = "bench"
client_id = "$cid"
client_secret_env = "BENCH_CLIENT_SECRET"
[[clients]]
name = "scripts"
key_sha256 = "$KEY_SHA256"
integration = "bench"
organizations = ["$ORG"]
EOF
    printf %s "$refresh" >"$dir/rt"
    BENCH_CLIENT_SECRET=$secret "$PROXY_BIN" --config "$dir/proxy.toml" grants import \
      --integration bench --org "$ORG" --refresh-token-file "$dir/rt" >"$dir/import.log" 2>&1
    BENCH_CLIENT_SECRET=$secret RUST_LOG=warn "$PROXY_BIN" --config "$dir/proxy.toml" run >"$dir/proxy.log" 2>&1 &
    local ppid=$!
    PIDS+=("$ppid")
    wait_port "$pport" "$ppid" "$dir/proxy.log"
    key=$KEY
    base="http://127.0.0.1:$pport/api/v1"
  fi
  echo "== $mode, $n script(s), ${DURATION}s"
  HOME="$dir" NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 \
    "$PY" benches/sdk_goodput.py "$base" "$key" "$ORG" "$n" "$DURATION" >"$dir/result.json" 2>"$dir/python.log" || {
    cat "$dir/python.log" >&2
    exit 1
  }
  local local429=0
  if [ "$mode" = proxy ]; then
    local429=$(curl -s "http://127.0.0.1:$aport/metrics" |
      awk '/^meraki_proxy_rate_limited_total\{/ { s += $NF } END { printf "%d", s }')
    stop_pid "$ppid"
  fi
  stop_pid "$spid"
  local limited allowed
  limited=$(val rate_limited)
  allowed=$(val rate_allowed)
  "$PY" - "$dir/result.json" "$mode" "$limited" "$allowed" "$local429" >>"$WORK/rows" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mode, limited, allowed, local429 = sys.argv[2], int(sys.argv[3] or 0), int(sys.argv[4] or 0), int(sys.argv[5])
print(f"{mode:<8} {r['processes']:>3} {r['calls_per_s']:>9.2f} {r['calls']:>7} {limited:>12} {allowed:>8} "
      f"{local429:>10} {r['failed']:>7} {r['p50_ms']:>9.0f} {r['p99_ms']:>9.0f}")
PY
  tail -n 1 "$WORK/rows"
}

for n in $COUNTS; do
  run direct "$n"
  run proxy "$n"
done

echo
echo "SDK goodput: official meraki SDK $("$PY" -c 'import meraki; print(meraki.__version__)'), getOrganization in a loop per script, ${DURATION}s per run;"
echo "upstream: stand-in enforcing 10 requests/s per organization (10 deep); proxy: [rate_limits] at Meraki's figures"
printf '%-8s %3s %9s %7s %12s %8s %10s %7s %9s %9s\n' mode N calls/s calls "Meraki 429s" "Meraki ok" "proxy 429s" failed "p50 ms" "p99 ms"
cat "$WORK/rows"
