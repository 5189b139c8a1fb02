#!/usr/bin/env python3
"""A legacy Meraki API-key script, driven by tests/sdk_interop.rs.

Usage: python tests/sdk/sdk_client.py <scenario>

Environment:
  PROXY_BASE      the proxy's base URL, e.g. http://127.0.0.1:8080/api/v1 (required)
  PROXY_KEY       the proxy client key the script uses as its "API key" (required)
  SDK_ORG_ID      organization to act on (default 111)
  SDK_NETWORK_ID  network to update (default L_111_0)
  SDK_CALLS       calls the `workload` scenario makes (default 30)

It uses the real official SDK (`meraki` on PyPI, pinned in tests/sdk/requirements.txt), set up
the way a script is after its only change: the base URL. It prints ONE JSON object on stdout:

  {"scenario": ..., "result": <what the SDK returned>, "base_url_after": <the SDK's base URL
   after the calls>, "seen": [<every HTTP exchange the client made>]}

`seen` is recorded with an httpx response hook on the SDK's own client, so it includes the SDK's
internal requests (smart-flow lookups) and every retry: method, url, status, and the Location,
Link and Retry-After headers the client was shown.

On an exception it prints {"error": <type>, "status": <HTTP status or null>, "message": ...,
"seen": [...]} and exits 1.
"""

import json
import os
import sys
import traceback
import urllib.parse

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def exchange(response, via):
    return {
        "via": via,
        "method": response.request.method,
        "url": str(response.request.url),
        "status": response.status_code,
        "location": response.headers.get("location"),
        "link": response.headers.get("link"),
        "retry_after": response.headers.get("retry-after"),
    }


def dashboard(seen):
    import meraki

    d = meraki.DashboardAPI(
        api_key=os.environ["PROXY_KEY"],
        base_url=os.environ["PROXY_BASE"],
        suppress_logging=True,
        output_log=False,
        print_console=False,
        maximum_retries=3,
        wait_on_rate_limit=True,
        nginx_429_retry_wait_time=1,
        single_request_timeout=30,
        caller="SdkInteropTest/1.0 MerakiOAuthProxy",
        # Smart flow (on by default since 4.x) stays on, as in a real script; only its mapping
        # cache is kept in memory instead of ~/.meraki, so runs do not influence each other.
        smart_flow_cache_path="",
    )
    # Observe what the SDK's HTTP client is actually shown (3xx, 429, ...).
    client = d._session._client
    client.event_hooks["response"].append(lambda r: seen.append(exchange(r, "sdk")))
    return d


def org_id():
    return os.environ.get("SDK_ORG_ID", "111")


@scenario
def getOrganizations(seen):
    d = dashboard(seen)
    return {"result": d.organizations.getOrganizations(), "base_url_after": d._session._base_url}


@scenario
def getOrganizations_all(seen):
    d = dashboard(seen)
    orgs = d.organizations.getOrganizations(total_pages="all", perPage=50)
    return {"result": orgs, "base_url_after": d._session._base_url}


@scenario
def getOrganization(seen):
    d = dashboard(seen)
    return {"result": d.organizations.getOrganization(org_id()), "base_url_after": d._session._base_url}


@scenario
def getOrganizationNetworks_all(seen):
    d = dashboard(seen)
    networks = d.organizations.getOrganizationNetworks(org_id(), total_pages="all", perPage=3)
    return {"result": networks, "base_url_after": d._session._base_url}


@scenario
def getOrganizationDevices(seen):
    d = dashboard(seen)
    devices = d.organizations.getOrganizationDevices(org_id(), total_pages="all", perPage=3)
    # The SDK rewrites its base URL from the Location of any 3xx it sees: a second call shows
    # whether it still talks to the proxy.
    second = d.organizations.getOrganization(org_id())
    return {"result": devices, "second": second, "base_url_after": d._session._base_url}


@scenario
def updateNetwork(seen):
    d = dashboard(seen)
    network_id = os.environ.get("SDK_NETWORK_ID", "L_111_0")
    updated = d.networks.updateNetwork(network_id, name="renamed by the sdk", tags=["sdk", "interop"])
    return {"result": updated, "base_url_after": d._session._base_url}


@scenario
def createOrganizationActionBatch(seen):
    d = dashboard(seen)
    actions = [
        {
            "resource": "/networks/" + os.environ.get("SDK_NETWORK_ID", "L_111_0"),
            "operation": "update",
            "body": {"name": "renamed by an action batch", "tags": ["batched"]},
        }
    ]
    batch = d.organizations.createOrganizationActionBatch(org_id(), actions, confirmed=True, synchronous=True)
    return {"result": batch, "base_url_after": d._session._base_url}


@scenario
def workload(seen):
    """A fixed workload, as a script polling one organization does: SDK_CALLS calls, alternating
    the organization and one of its networks, one at a time (the SDK's smart flow paces them)."""
    d = dashboard(seen)
    network_id = os.environ.get("SDK_NETWORK_ID", "L_111_0")
    calls = int(os.environ.get("SDK_CALLS", "30"))
    done = 0
    for i in range(calls):
        if i % 2:
            d.networks.getNetwork(network_id)
        else:
            d.organizations.getOrganization(org_id())
        done += 1
    return {"result": {"calls": done}, "base_url_after": d._session._base_url}


@scenario
def rfc8288_walk(seen):
    """The same walk as getOrganizationNetworks_all, by an RFC 8288 client: each `next` target
    is resolved against the URL of the response that carried it."""
    import requests

    class WalkError(Exception):
        pass

    http = requests.Session()
    http.headers["X-Cisco-Meraki-API-Key"] = os.environ["PROXY_KEY"]
    http.headers["User-Agent"] = "Rfc8288Walk/1.0 MerakiOAuthProxy"
    url = os.environ["PROXY_BASE"] + "/organizations/" + org_id() + "/networks?perPage=3"
    items = []
    for _ in range(50):
        resp = http.get(url, allow_redirects=False, timeout=30)
        entry = exchange(resp, "requests")
        seen.append(entry)
        if resp.status_code != 200:
            err = WalkError(resp.text[:500])
            err.status = resp.status_code
            raise err
        items.extend(resp.json())
        nxt = resp.links.get("next")
        if not nxt:
            return {"result": items}
        url = urllib.parse.urljoin(resp.url, nxt["url"])
    raise RuntimeError("more than 50 pages")


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        print(f"usage: {sys.argv[0]} <{'|'.join(SCENARIOS)}>", file=sys.stderr)
        return 2
    name = sys.argv[1]
    seen = []
    try:
        out = SCENARIOS[name](seen)
    except Exception as e:  # noqa: BLE001 -- every failure is reported as JSON
        message = getattr(e, "message", None)
        if message is None:
            message = str(e)
        print(
            json.dumps(
                {
                    "scenario": name,
                    "error": type(e).__name__,
                    "status": getattr(e, "status", None),
                    "message": message,
                    "seen": seen,
                }
            )
        )
        traceback.print_exc(file=sys.stderr)
        return 1
    out["scenario"] = name
    out["seen"] = seen
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
