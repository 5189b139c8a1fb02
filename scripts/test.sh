#!/usr/bin/env bash
# Runs every test of the project: unit tests, the end-to-end suites against the real binary and
# the Meraki stand-in, the official-SDK interop suite, the micro-benchmarks in quick mode and the
# load script in quick mode. Needs the packages .ci/run installs (cmake, nginx, wrk, chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Python environment for the official meraki SDK"
export MERAKI_SDK_PYTHON="$(bash scripts/python-env.sh | tail -n 1)"

echo "== cargo test (unit, end-to-end, SDK interop, examples)"
cargo test --all-features --tests --examples --lib --bins

echo "== Prometheus rules and scrape example (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts_test.yml

echo "== micro-benchmarks, quick mode"
cargo bench --bench hot_path -- --test

echo "== load benchmark, quick mode (checks every configuration answers; no timing assertions)"
QUICK=1 bash benches/load.sh
