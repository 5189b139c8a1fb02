#!/usr/bin/env bash
# Runs every test of the project: unit tests, the end-to-end suites against the real binary and
# the Meraki stand-in, the official-SDK interop suite, the fuzz targets for a bounded time
# (FUZZ_SECS each, default 60), the micro-benchmarks in quick mode and the load script in quick
# mode. Needs the packages .ci/run installs (cmake, nginx, wrk, chromium, postgresql, buildah, debootstrap, systemd-container) and a nightly toolchain
# for cargo-fuzz (installed from crates.io when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# Free disk after each phase (a CI run once failed with "No space left on device" while linking).
free_disk() { echo "   free disk: $(df -h --output=avail . | tail -n 1 | tr -d ' ')"; }
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
free_disk

echo "== Python environment for the official meraki SDK"
export MERAKI_SDK_PYTHON="$(bash scripts/python-env.sh | tail -n 1)"

echo "== cargo test (unit, end-to-end, SDK interop, examples)"
cargo test --all-features --tests --examples --lib --bins
free_disk
# PRUNE_BUILDS=1 (set by .ci/run) removes build trees once nothing later reads them.
if [ "${PRUNE_BUILDS:-0}" = 1 ]; then rm -rf "$target_dir/debug"; echo "   removed $target_dir/debug"; free_disk; fi

echo "== Prometheus rules and scrape example (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts_test.yml

echo "== fuzzing: each target ${FUZZ_SECS:-60} s on the committed corpus (cargo-fuzz, nightly)"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
fuzz_work="$(mktemp -d)"
trap 'rm -rf "$fuzz_work"' EXIT
for target in route_parse batch_resources link_rewrite config_parse; do
  # New inputs go to a scratch directory; the committed corpus is read only.
  mkdir -p "$fuzz_work/$target"
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$fuzz_work/$target" "fuzz/corpus/$target" \
    -- -max_total_time="${FUZZ_SECS:-60}" -print_final_stats=1 >"$fuzz_work/$target.log" 2>&1; then
    tail -n 60 "$fuzz_work/$target.log" >&2
    echo "fuzz target $target failed" >&2
    exit 1
  fi
  echo "   $target: $(grep -E '^stat::number_of_executed_units' "$fuzz_work/$target.log" | tr -d ' ') $(grep -E '^stat::new_units_added' "$fuzz_work/$target.log" | tr -d ' ')"
done

if [ "${PRUNE_BUILDS:-0}" = 1 ]; then rm -rf fuzz/target; echo "   removed fuzz/target"; fi
free_disk

echo "== micro-benchmarks, quick mode"
cargo bench --bench hot_path -- --test

echo "== load benchmark, quick mode (checks every configuration answers; no timing assertions)"
QUICK=1 bash benches/load.sh

echo "== SDK goodput under Meraki's rate limit, quick mode (direct vs through the proxy; fails only if nothing starts)"
QUICK=1 bash benches/sdk_goodput.sh

echo "== container image (the Dockerfile built with buildah on debootstrap stand-ins, run) and the systemd unit booted in systemd-nspawn"
# The stand-in comes from the release build the load benchmark made (no second, debug, build).
export STANDIN_BIN="$target_dir/release/examples/meraki_standin"
if [ "$(id -u)" -eq 0 ]; then bash scripts/image-test.sh; else sudo -E bash scripts/image-test.sh; fi
free_disk

echo "== scale benchmark, quick mode (10 and 200 organizations, 10 and 1,000 keys; fails only on errors)"
QUICK=1 cargo bench --bench scale
free_disk

echo "== fleet benchmark, quick mode (1 and 3 instances on PostgreSQL; fails only on errors)"
QUICK=1 cargo bench --bench fleet
free_disk
