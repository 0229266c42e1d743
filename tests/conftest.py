"""Shared fixtures: real model files, real photos, and real services started
as subprocesses on free loopback ports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
import httpx
import numpy as np
import pytest
import skimage.data
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.topology import SERVICES

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("IMAGEMESH_TEST_MODELS", ROOT.parent / "shared" / "models"))


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


def psnr(a: np.ndarray, b: np.ndarray, maximum: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(maximum ** 2 / mse)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (SHARED_MODELS / "realesr-general-x4v3_fp16.onnx").is_file():
        pytest.fail(f"model files not found in {SHARED_MODELS} (set IMAGEMESH_TEST_MODELS)")
    return SHARED_MODELS


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph, cropped small so that CPU inference stays quick."""
    return np.ascontiguousarray(skimage.data.coffee()[100:196, 200:328])


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[40:136, 180:260])


class Service:
    """A service process on loopback; stopped (SIGTERM) by the fixture."""

    def __init__(self, module: str, env: dict, log_path: Path, argv: list[str] | None = None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(argv or [sys.executable, "-m", module], cwd=ROOT, env={**os.environ, **env},
                                        stdout=self.log, stderr=subprocess.STDOUT)

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
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not serving after {timeout}s:\n{service.logs()[-3000:]}")


def effects_stream(channel: grpc.Channel):
    """The effects service's streaming call on a channel, as any gRPC client makes it."""
    from imagemesh.v1 import pipeline_pb2
    return channel.stream_stream("/imagemesh.v1.Effects/ApplyEffects",
                                 request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
                                 response_deserializer=pipeline_pb2.StreamResponse.FromString)


SERVICE_MODULES = {service.name: service.module for service in SERVICES}


@pytest.fixture(scope="session")
def mesh_ports() -> dict[str, int]:
    """Ports chosen up front so that each service knows where the others are."""
    return dict(zip(SERVICE_MODULES, free_ports(len(SERVICE_MODULES))))


def mesh_addresses(ports: dict[str, int]) -> dict[str, str]:
    return {f"{name.upper()}_ADDRESS": f"127.0.0.1:{port}" for name, port in ports.items()}


def start_service(name: str, tmp_path_factory, model_dir: Path, port: int | None = None,
                  addresses: dict | None = None, **env) -> Service:
    candidates = [p for p in free_ports(3) if p != port]  # never the port already promised to it
    port, metrics_port = port or candidates[0], candidates[1]
    upper = name.upper()
    service = Service(SERVICE_MODULES[name], {
        "MODEL_DIR": str(model_dir), f"{upper}_PORT": str(port), f"{upper}_METRICS_PORT": str(metrics_port),
        "ONNX_CACHE_DIR": str(tmp_path_factory.mktemp("onnx")),
        "BGREMOVAL_DB": str(tmp_path_factory.mktemp("db") / "bgremoval.sqlite3"), **(addresses or {}), **env},
        tmp_path_factory.mktemp("logs") / f"{name}.log")
    service.address = f"127.0.0.1:{port}"
    service.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for_grpc_serving(service.address, service)
    return service


def start_upscaler(tmp_path_factory, model_dir: Path, **env) -> Service:
    return start_service("upscaler", tmp_path_factory, model_dir, **env)


def _mesh_service(name, tmp_path_factory, model_dir, mesh_ports):
    service = start_service(name, tmp_path_factory, model_dir, mesh_ports[name], mesh_addresses(mesh_ports))
    yield service
    service.stop()


@pytest.fixture(scope="session")
def upscaler(tmp_path_factory, model_dir, mesh_ports):
    yield from _mesh_service("upscaler", tmp_path_factory, model_dir, mesh_ports)


@pytest.fixture(scope="session")
def bgremoval(tmp_path_factory, model_dir, mesh_ports):
    yield from _mesh_service("bgremoval", tmp_path_factory, model_dir, mesh_ports)


@pytest.fixture(scope="session")
def effects(tmp_path_factory, model_dir, mesh_ports):
    yield from _mesh_service("effects", tmp_path_factory, model_dir, mesh_ports)


@pytest.fixture(scope="session")
def mesh(upscaler, bgremoval, effects):
    return {"upscaler": upscaler, "bgremoval": bgremoval, "effects": effects}


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, mesh, mesh_ports):
    service = start_gateway(tmp_path_factory, mesh_ports, RATE_LIMIT_PER_MINUTE="0")
    yield service
    service.stop()


def start_gateway(tmp_path_factory, ports: dict[str, int], **env) -> Service:
    """A gateway on a free port; waits until it answers (not until the services are ready)."""
    port = free_port()
    result_dir = tmp_path_factory.mktemp("results")
    service = Service("services.gateway", {
        "GATEWAY_PORT": str(port), "RESULT_DIR": str(result_dir), **mesh_addresses(ports), **env},
        tmp_path_factory.mktemp("logs") / "gateway.log")
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


@pytest.fixture(scope="session")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis (Debian's redis-server) on loopback, nothing persisted."""
    import redis
    port = free_port()
    service = Service.command(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                              tmp_path_factory.mktemp("logs") / "redis.log")
    client = redis.Redis(port=port)
    service.wait_until(client.ping, redis.ConnectionError, 30)
    service.port, service.databases = port, iter(range(16))
    yield service
    client.close()
    service.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """A Redis database of the test's own (16 in a session)."""
    return f"redis://127.0.0.1:{redis_server.port}/{next(redis_server.databases)}"


def postgres_binary(name: str) -> str:
    import glob
    import shutil
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: run `make test-deps` (Debian's postgresql)")
    return found


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL (Debian's) on loopback, in a throwaway data directory; as root,
    it runs as the postgres user (PostgreSQL refuses root)."""
    import shutil
    import tempfile

    import psycopg
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="imagemesh-pg-"))
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run([*as_postgres, postgres_binary("initdb"), "-D", str(data), "-U", "imagemesh", "--auth=trust",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    port = free_port()
    service = Service.command([*as_postgres, postgres_binary("postgres"), "-D", str(data), "-p", str(port),
                               "-k", str(data), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              tmp_path_factory.mktemp("logs") / "postgres.log")
    admin = f"postgresql://imagemesh@127.0.0.1:{port}/postgres"
    service.wait_until(lambda: psycopg.connect(admin, connect_timeout=2).close(), psycopg.OperationalError, 60)
    service.admin_url, service.databases = admin, iter(range(1000))
    yield service
    service.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A new, empty database of the test's own."""
    import psycopg
    name = f"picks_{next(postgres_server.databases)}"
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres_server.admin_url.rsplit("/", 1)[0] + f"/{name}"
