"""The Envoy configuration a local mesh runs: deploy/envoy/envoy.yaml, the one
that deploys, with loopback addresses as its only change."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "envoy.yaml"


def local_config(endpoints: dict[str, list[int]], listener: int, admin: int,
                 web_origins: list[str] | None = None) -> dict:
    """`endpoints`: each cluster's loopback ports (a service's replicas); `web_origins`:
    the origins whose browsers may call gRPC-Web (default: this listener's own)."""
    config = copy.deepcopy(yaml.safe_load(SHIPPED.read_text()))
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                                               "port_value": listener}
    origins = web_origins or [f"http://127.0.0.1:{listener}", f"http://localhost:{listener}"]
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for host in manager["route_config"]["virtual_hosts"]:
        cors = host.get("typed_per_filter_config", {}).get("envoy.filters.http.cors")
        if cors:
            cors["allow_origin_string_match"] = [{"exact": origin} for origin in origins]
    for cluster in config["static_resources"]["clusters"]:
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            for port in endpoints[cluster["name"]]]}]
    return config
