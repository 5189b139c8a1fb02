#!/usr/bin/env python3
"""N scripts using the official Meraki SDK against one organization, for a fixed time; driven by
benches/sdk_goodput.sh.

Usage: python benches/sdk_goodput.py BASE_URL API_KEY ORG PROCESSES SECONDS

Each of PROCESSES processes is a script as people write them: a DashboardAPI with the SDK's
defaults (smart flow on: its own token bucket per organization at 9 requests/s, x0.7 on a 429;
429s retried after Retry-After), calling getOrganization(ORG) one call after another until
SECONDS have passed. Prints one JSON object: calls completed, calls/s, failed calls, the 429s the
SDKs were shown (those the proxy made itself, X-Proxy-Upstream: not-sent, counted apart), and
the p50/p99 of a call's duration (its waits, retries and smart-flow pacing included).
"""

import json
import multiprocessing
import os
import sys
import time


def worker(args):
    base, key, org, seconds, start_at = args
    import meraki

    d = meraki.DashboardAPI(
        api_key=key,
        base_url=base,
        suppress_logging=True,
        output_log=False,
        print_console=False,
        caller="SdkGoodputBench/1.0 MerakiOAuthProxy",
        smart_flow_cache_path="",
    )
    shown = {"upstream_429": 0, "local_429": 0}

    def hook(r):
        if r.status_code == 429:
            if r.headers.get("x-proxy-upstream") == "not-sent":
                shown["local_429"] += 1
            else:
                shown["upstream_429"] += 1

    d._session._client.event_hooks["response"].append(hook)
    durations, failed = [], 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    while time.time() < deadline:
        t = time.perf_counter()
        try:
            d.organizations.getOrganization(org)
            durations.append(time.perf_counter() - t)
        except Exception:  # noqa: BLE001 -- an exhausted retry budget counts as a failed call
            failed += 1
    return durations, failed, shown


def percentile(xs, p):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main():
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    base, key, org, n, seconds = sys.argv[1:6]
    n, seconds = int(n), float(seconds)
    start_at = time.time() + 2.0  # every process imported the SDK and is ready
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        results = pool.map(worker, [(base, key, org, seconds, start_at)] * n)
    durations = [d for r in results for d in r[0]]
    out = {
        "processes": n,
        "seconds": seconds,
        "calls": len(durations),
        "calls_per_s": len(durations) / seconds,
        "failed": sum(r[1] for r in results),
        "sdk_saw_upstream_429": sum(r[2]["upstream_429"] for r in results),
        "sdk_saw_local_429": sum(r[2]["local_429"] for r in results),
        "p50_ms": 1000 * percentile(durations, 50),
        "p99_ms": 1000 * percentile(durations, 99),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
