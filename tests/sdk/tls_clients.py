#!/usr/bin/env python3
"""Real Meraki clients over HTTPS through the proxy, driven by tests/tls_e2e.rs.

Usage: python tests/sdk/tls_clients.py <scenario>

Scenarios:
  sdk            the official SDK (`meraki`), base_url=PROXY_BASE (unset: its default,
                 https://api.meraki.com/api/v1), certificate_path=CA_BUNDLE
  meraki_client  `meraki-client` (PyPI), which accepts only Meraki's cloud hosts as base URL:
                 BaseURL.DEFAULT, or the one named by MERAKI_REGION (e.g. CANADA)
  sdk_update     the official SDK renames NETWORK_ID first thing: its smart flow resolves the
                 unknown network's organization and walks that organization's networks
                 (perPage=1000, following each `Link` target as it is) before the update

sdk and meraki_client walk every page of getOrganizationNetworks (perPage=PER_PAGE) and rename
NETWORK_ID to NEW_NAME, the way an unmodified script would.

Environment:
  PROXY_KEY        the proxy client key (required)
  CA_BUNDLE        the private CA the proxy's certificate is issued by (required)
  ORG_ID           default 111; NETWORK_ID default L_111_0; NEW_NAME; PER_PAGE default 3
  SPLIT_HORIZON    "host,host,...=127.0.0.1:PORT": for THIS process only, those names on port
                   443 resolve to the proxy (the resolver is overridden in the process; the
                   machine's resolver is not touched)

Prints ONE JSON object: {"scenario", "networks": [ids], "updated": <the renamed network>,
"seen": [every HTTP exchange: method, url, status, link]}; on an exception
{"error", "message", "seen"} and exit status 1.
"""

import json
import os
import socket
import sys
import traceback

SEEN = []


def split_horizon():
    """Resolves the listed names to the proxy for this process alone."""
    spec = os.environ.get("SPLIT_HORIZON")
    if not spec:
        return
    names, addr = spec.split("=", 1)
    names = {n.strip().lower() for n in names.split(",") if n.strip()}
    host, port = addr.rsplit(":", 1)
    port = int(port)
    real = socket.getaddrinfo

    def getaddrinfo(name, service, *args, **kwargs):
        if isinstance(name, bytes):
            name = name.decode()
        if name and name.lower() in names and str(service) in ("443", "https"):
            return real(host, port, *args, **kwargs)
        if name and name.lower().endswith((".meraki.com", ".meraki.ca", ".meraki.cn", ".meraki.in")):
            # Nothing may reach Meraki itself: a page that bypassed the proxy fails loudly.
            raise socket.gaierror(socket.EAI_NONAME, f"{name} is not resolvable in this test")
        return real(name, service, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def record(response):
    response.read()
    SEEN.append(
        {
            "method": response.request.method,
            "url": str(response.request.url),
            "status": response.status_code,
            "link": response.headers.get("link"),
        }
    )


def org():
    return os.environ.get("ORG_ID", "111")


def network():
    return os.environ.get("NETWORK_ID", "L_111_0")


def per_page():
    return int(os.environ.get("PER_PAGE", "3"))


def dashboard():
    import meraki

    kwargs = dict(
        api_key=os.environ["PROXY_KEY"],
        certificate_path=os.environ["CA_BUNDLE"],
        suppress_logging=True,
        output_log=False,
        print_console=False,
        maximum_retries=2,
        single_request_timeout=30,
        caller="TlsInteropTest/1.0 MerakiOAuthProxy",
        smart_flow_cache_path="",
    )
    if os.environ.get("PROXY_BASE"):
        kwargs["base_url"] = os.environ["PROXY_BASE"]
    d = meraki.DashboardAPI(**kwargs)
    d._session._client.event_hooks["response"].append(record)
    return d


def sdk():
    d = dashboard()
    nets = d.organizations.getOrganizationNetworks(org(), total_pages="all", perPage=per_page())
    updated = d.networks.updateNetwork(network(), name=os.environ["NEW_NAME"])
    return [n["id"] for n in nets], updated


def meraki_client():
    from meraki_client import BaseURL, MerakiClient

    region = os.environ.get("MERAKI_REGION", "DEFAULT")
    c = MerakiClient(
        api_key=os.environ["PROXY_KEY"],
        base_url=getattr(BaseURL, region),
        certificate_path=os.environ["CA_BUNDLE"],
        maximum_retries=1,
        caller="TlsInteropTest/1.0 MerakiOAuthProxy",
    )
    c._session._client.event_hooks["response"].append(record)
    nets = c.organizations.get_organization_networks(
        org(), per_page=per_page(), total_pages="all"
    ).collect()
    updated = c.networks.update_network(network(), name=os.environ["NEW_NAME"])
    return [n.id for n in nets], updated.model_dump(mode="json", by_alias=True)


def sdk_update():
    d = dashboard()
    updated = d.networks.updateNetwork(network(), name=os.environ["NEW_NAME"])
    return [], updated


SCENARIOS = {"sdk": sdk, "meraki_client": meraki_client, "sdk_update": sdk_update}


def main():
    name = sys.argv[1]
    split_horizon()
    try:
        networks, updated = SCENARIOS[name]()
    except Exception as e:  # noqa: BLE001 - reported to the Rust side
        print(
            json.dumps(
                {
                    "scenario": name,
                    "error": type(e).__name__,
                    "message": str(e),
                    "seen": SEEN,
                }
            )
        )
        traceback.print_exc()
        sys.exit(1)
    print(json.dumps({"scenario": name, "networks": networks, "updated": updated, "seen": SEEN}))


if __name__ == "__main__":
    main()
