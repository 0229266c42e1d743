"""The Envoy configuration a local mesh runs: deploy/envoy/envoy.yaml, the one
that deploys, with loopback addresses (and the files of a local certificate) as
its only changes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "envoy.yaml"
SHIPPED_TLS_SECRET = SHIPPED.with_name("tls-sds.yaml")  # at DEPLOYED_TLS_SECRET in the Envoy pod
DEPLOYED_TLS_SECRET = "/etc/envoy/tls-sds.yaml"
TLS_LISTENER = "ingress_tls"


@dataclass(frozen=True)
class LocalTls:
    """Envoy's HTTPS listener on `port` with a certificate and key from local files;
    the secret naming them is written to `secret_path`."""

    port: int
    certificate: Path
    key: Path
    secret_path: Path

    def write_secret(self) -> None:
        secret = yaml.safe_load(SHIPPED_TLS_SECRET.read_text())
        files = secret["resources"][0]["tls_certificate"]
        files["certificate_chain"]["filename"] = str(Path(self.certificate).resolve())
        files["private_key"]["filename"] = str(Path(self.key).resolve())
        self.secret_path.write_text(yaml.safe_dump(secret))


def tls_secret_source(listener: dict) -> dict:
    context = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    return context["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]


def local_config(
    endpoints: dict[str, list[int]],
    listener: int,
    admin: int,
    web_origins: list[str] | None = None,
    tls: LocalTls | None = None,
) -> dict:
    """`endpoints`: each cluster's loopback ports (a service's replicas); `web_origins`:
    the origins whose browsers may call gRPC-Web (default: this listener's own); `tls`:
    the HTTPS listener, left out without it."""
    config = copy.deepcopy(yaml.safe_load(SHIPPED.read_text()))
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    listeners = config["static_resources"]["listeners"]
    listeners[0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listener}
    secure = next(entry for entry in listeners if entry["name"] == TLS_LISTENER)
    if tls is None:
        listeners.remove(secure)
    else:
        secure["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": tls.port}
        tls_secret_source(secure)["path"] = str(tls.secret_path)
    origins = web_origins or [f"http://127.0.0.1:{listener}", f"http://localhost:{listener}"]
    manager = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    for host in manager["route_config"]["virtual_hosts"]:
        cors = host.get("typed_per_filter_config", {}).get("envoy.filters.http.cors")
        if cors:
            cors["allow_origin_string_match"] = [{"exact": origin} for origin in origins]
    for cluster in config["static_resources"]["clusters"]:
        cluster["load_assignment"]["endpoints"] = [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    for port in endpoints[cluster["name"]]
                ]
            }
        ]
    return config
