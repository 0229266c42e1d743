"""Real processes on free loopback ports: our services, and servers that are not ours."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.topology import SERVICES
from services.upscaler.engine import CPU_MAX_TILE

ROOT = Path(__file__).resolve().parents[2]
SHARED_MODELS = Path(os.environ.get("IMAGEMESH_TEST_MODELS", ROOT.parent / "shared" / "models"))
SERVICE_MODULES = {service.name: service.module for service in SERVICES}
# An upscaler exact to the bit (fp32, as the reference computes) at a fixed tile: nothing timed at start.
EXACT_UPSCALER = {"UPSCALER_BACKEND": "torch-fp32", "UPSCALER_TILE": str(CPU_MAX_TILE)}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different free loopback ports (held together while chosen, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Service:
    """A service process on loopback; stopped (SIGTERM) by the fixture."""

    def __init__(self, module: str, env: dict, log_path: Path, argv: list[str] | None = None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            argv or [sys.executable, "-m", module],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @classmethod
    def command(cls, argv: list[str], log_path: Path) -> Service:
        """A server that is not ours (Redis, PostgreSQL)."""
        return cls("", {}, log_path, argv)

    def wait_until(self, ready: Callable[[], object], not_yet: type[Exception], seconds: float) -> None:
        """Call `ready` until it stops raising `not_yet`; fail with the log if the process ends or time runs out."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                ready()
                return
            except not_yet:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"{self.log_path.name}: not ready:\n{self.logs()[-3000:]}") from None
                time.sleep(0.1)

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_for_grpc_serving(address: str, service: Service, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{service.logs()[-3000:]}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not serving after {timeout}s:\n{service.logs()[-3000:]}")


def mesh_addresses(ports: dict[str, int]) -> dict[str, str]:
    return {f"{name.upper()}_ADDRESS": f"127.0.0.1:{port}" for name, port in ports.items()}


def start_service(
    name: str, tmp_path_factory, model_dir: Path, port: int | None = None, addresses: dict | None = None, **env
) -> Service:
    candidates = [p for p in free_ports(3) if p != port]  # never the port already promised to it
    port, metrics_port = port or candidates[0], candidates[1]
    upper = name.upper()
    service = Service(
        SERVICE_MODULES[name],
        {
            "MODEL_DIR": str(model_dir),
            f"{upper}_PORT": str(port),
            f"{upper}_METRICS_PORT": str(metrics_port),
            "ONNX_CACHE_DIR": str(tmp_path_factory.mktemp("onnx")),
            "BGREMOVAL_DB": str(tmp_path_factory.mktemp("db") / "bgremoval.sqlite3"),
            **(addresses or {}),
            **env,
        },
        tmp_path_factory.mktemp("logs") / f"{name}.log",
    )
    service.address = f"127.0.0.1:{port}"
    service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for_grpc_serving(service.address, service)
    return service


def start_upscaler(tmp_path_factory, model_dir: Path, **env) -> Service:
    return start_service("upscaler", tmp_path_factory, model_dir, **env)


def start_gateway(tmp_path_factory, ports: dict[str, int], **env) -> Service:
    """A gateway on a free port; waits until it answers (not until the services are ready)."""
    port = free_port()
    result_dir = tmp_path_factory.mktemp("results")
    service = Service(
        "services.gateway",
        {"GATEWAY_PORT": str(port), "RESULT_DIR": str(result_dir), **mesh_addresses(ports), **env},
        tmp_path_factory.mktemp("logs") / "gateway.log",
    )
    service.url = f"http://127.0.0.1:{port}"
    service.result_dir = result_dir
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{service.url}/healthz", timeout=2)
            return service
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or service.process.poll() is not None:
            raise RuntimeError(f"gateway did not start:\n{service.logs()[-3000:]}")
        time.sleep(0.1)


def postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: run `make test-deps` (Debian's postgresql)")
    return found


def in_flight(service) -> float:
    """The requests a service counts in flight, from its own metrics."""
    text = httpx.get(service.metrics_url).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("imagemesh_grpc_requests_in_flight{")
    )
