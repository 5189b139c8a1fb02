#!/usr/bin/env bash
# Memory per connection (docs/performance.md, "Slow clients and connection limits"): the proxy's
# RSS at rest, with 2,000 idle connections, with 2,000 slow-header connections, with 200 active
# keep-alive connections, and after each set closes. Loopback only, bounded (about two minutes);
# the figures are printed, not asserted (tests/exhaustion_e2e.rs asserts the bounds in CI).
#
#   bash benches/memory.sh             # the debug build the test suite uses (docs' figures)
#   RELEASE=1 bash benches/memory.sh   # a release build (LTO: a long build)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
if [ "${RELEASE:-0}" = 1 ]; then profile=(--release); fi
cargo test "${profile[@]}" --all-features --test exhaustion_e2e memory_per_connection -- \
  --ignored --nocapture --test-threads 1
