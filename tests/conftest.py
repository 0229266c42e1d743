"""Shared fixtures: real model files, real photos, and real services started
as subprocesses on free loopback ports (the helpers that start them: support/)."""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data

from support.clients import ImageServer
from support.processes import (
    SERVICE_MODULES,
    SHARED_MODELS,
    Service,
    free_port,
    free_ports,
    mesh_addresses,
    postgres_binary,
    start_gateway,
    start_service,
)


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


@pytest.fixture(scope="session")
def mesh_ports() -> dict[str, int]:
    """Ports chosen up front so that each service knows where the others are."""
    return dict(zip(SERVICE_MODULES, free_ports(len(SERVICE_MODULES))))


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


@pytest.fixture(scope="session")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis (Debian's redis-server) on loopback, nothing persisted."""
    import redis

    port = free_port()
    service = Service.command(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        tmp_path_factory.mktemp("logs") / "redis.log",
    )
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
    subprocess.run(
        [*as_postgres, postgres_binary("initdb"), "-D", str(data), "-U", "imagemesh", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    service = Service.command(
        [
            *as_postgres,
            postgres_binary("postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
        tmp_path_factory.mktemp("logs") / "postgres.log",
    )
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


@pytest.fixture(scope="module")
def image_server():
    """A loopback web server for image_url inputs; `hits` lists the paths it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
