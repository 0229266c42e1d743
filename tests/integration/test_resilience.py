"""Replicas that come and go, overload, and clients that leave: real processes on loopback."""

import io
import signal
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2
from PIL import Image

from services.common import wire
from services.common.tiles import grid
from support.images import png
from support.processes import (
    EXACT_UPSCALER,
    Service,
    free_port,
    free_ports,
    in_flight,
    mesh_addresses,
    start_gateway,
    start_service,
)


@pytest.fixture
def two_replicas(tmp_path_factory, model_dir):
    """Two upscaler replicas (one backend for both, so that their bands agree bit for bit)."""
    ports = dict(zip(("upscaler", "bgremoval", "effects"), free_ports(3)))
    replicas = [
        start_service(
            "upscaler",
            tmp_path_factory,
            model_dir,
            port,
            **EXACT_UPSCALER,
            MAX_CONCURRENT_REQUESTS="2",
            MAX_QUEUED_REQUESTS="16",
        )
        for port in (ports["upscaler"], free_port())
    ]
    addresses = {**mesh_addresses(ports), "UPSCALER_ADDRESS": ",".join(r.address for r in replicas)}
    yield replicas, addresses
    for replica in replicas:
        replica.stop()


def gateway_for(tmp_path_factory, addresses, **env):
    port = free_port()
    service = Service(
        "services.gateway",
        {
            "GATEWAY_PORT": str(port),
            "RATE_LIMIT_PER_MINUTE": "0",
            "RESULT_DIR": str(tmp_path_factory.mktemp("results")),
            **addresses,
            **env,
        },
        tmp_path_factory.mktemp("logs") / "gateway.log",
    )
    service.url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(service.url + "/healthz", timeout=1)
            return service
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(service.logs())


def test_a_replica_killed_mid_upscale_loses_nothing(two_replicas, tmp_path_factory, photo):
    replicas, addresses = two_replicas
    gateway = gateway_for(tmp_path_factory, addresses, UPSCALE_BAND_ROWS="64")
    image = np.tile(photo, (4, 2, 1))  # 384 x 256: six bands of 64 rows
    fields = {"scale": "4", "model": "realesr-general-x4v3", "format": "png", "tile": "128"}
    try:
        with httpx.Client(base_url=gateway.url, timeout=300) as client:
            clean = client.post("/v1/upscale", files={"file": ("p.png", png(image))}, data=fields)
            assert clean.status_code == 200, clean.text
            for replica in replicas:  # both replicas took bands: the work was spread
                assert "Upscale" in httpx.get(replica.metrics_url).text

            answer = {}
            request = threading.Thread(
                target=lambda: answer.update(
                    reply=client.post("/v1/upscale", files={"file": ("p.png", png(image))}, data=fields)
                )
            )
            request.start()
            deadline = time.monotonic() + 60
            while in_flight(replicas[1]) == 0:  # kill it while it is working
                assert time.monotonic() < deadline
                time.sleep(0.02)
            replicas[1].process.send_signal(signal.SIGKILL)
            request.join(300)
            reply = answer["reply"]
            assert reply.status_code == 200, reply.text
            assert np.array_equal(
                np.asarray(Image.open(io.BytesIO(reply.content))), np.asarray(Image.open(io.BytesIO(clean.content)))
            )
        assert "retrying on another replica" in gateway.logs()
    finally:
        gateway.stop()


def test_sigterm_on_a_replica_under_load_fails_no_request(two_replicas, tmp_path_factory, photo):
    replicas, addresses = two_replicas
    gateway = gateway_for(tmp_path_factory, addresses)
    replies = []

    def client_loop():
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            for _ in range(6):
                replies.append(
                    client.post(
                        "/v1/upscale",
                        files={"file": ("p.png", png(photo))},
                        data={"scale": "2", "model": "realesr-general-x4v3"},
                    ).status_code
                )

    try:
        threads = [threading.Thread(target=client_loop) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        replicas[0].process.send_signal(signal.SIGTERM)  # drains: finishes what it has, takes nothing new
        for thread in threads:
            thread.join(300)
        assert replies == [200] * 18, replies
        assert replicas[0].process.wait(timeout=60) == 0
    finally:
        gateway.stop()


def test_overload_is_refused_cleanly_and_service_resumes(tmp_path_factory, model_dir, photo):
    ports = dict(zip(("upscaler", "bgremoval", "effects"), free_ports(3)))
    upscaler = start_service(
        "upscaler",
        tmp_path_factory,
        model_dir,
        ports["upscaler"],
        mesh_addresses(ports),
        **EXACT_UPSCALER,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUED_REQUESTS="1",
    )
    gateway = start_gateway(tmp_path_factory, ports, RATE_LIMIT_PER_MINUTE="0")
    statuses, retry_after = [], []

    def one():
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            reply = client.post(
                "/v1/upscale",
                files={"file": ("p.png", png(photo))},
                data={"scale": "4", "model": "realesr-general-x4v3"},
            )
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                retry_after.append(reply.headers.get("retry-after"))
                assert reply.json()["error"]["code"] == "overloaded"

    try:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 2 and 429 in statuses, statuses
        assert all(retry_after)
        with httpx.Client(base_url=gateway.url, timeout=120) as client:  # and afterwards it serves normally
            assert (
                client.post(
                    "/v1/upscale", files={"file": ("p.png", png(photo))}, data={"scale": "2", "model": "lanczos"}
                ).status_code
                == 200
            )
    finally:
        gateway.stop()
        upscaler.stop()


def test_a_client_that_leaves_stops_the_work_in_every_service(mesh, gateway, photo):
    image = np.tile(photo, (8, 8, 1))  # 768 x 1024: many seconds of work at 4x
    steps = (
        '[{"op": "upscale", "scale": 4, "model": "realesr-general-x4v3", "tile": 64}, '
        '{"op": "effect", "effect": "blackwhite"}]'
    )

    def leave_early():
        try:
            httpx.post(
                f"{gateway.url}/v1/process",
                files={"file": ("p.png", png(image))},
                data={"steps": steps, "format": "jpeg"},
                timeout=1.5,
            )
        except httpx.TimeoutException:
            pass  # the client gives up and closes the connection

    started = time.monotonic()
    leave_early()
    assert in_flight(mesh["upscaler"]) >= 0
    deadline = time.monotonic() + 15
    while in_flight(mesh["upscaler"]) or in_flight(mesh["effects"]):
        assert time.monotonic() < deadline, "the services kept working for a client that left"
        time.sleep(0.1)
    # Upscaling this image takes far longer than the time it took to stop.
    assert time.monotonic() - started < 15
    assert "client went away" in gateway.logs()


ABANDONED_STREAMS = {
    "upscaler": ("/imagemesh.v1.Upscaler/Upscale", pipeline_pb2.Step(upscale=pipeline_pb2.UpscaleOptions(scale=2))),
    "bgremoval": (
        "/imagemesh.v1.BackgroundRemoval/RemoveBackground",
        pipeline_pb2.Step(remove_background=pipeline_pb2.RemoveBackgroundOptions(model="keyer")),
    ),
    "effects": (
        "/imagemesh.v1.Effects/ApplyEffects",
        pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="blackwhite")),
    ),
}


def requests_total(service, method: str, code: str) -> float:
    pattern = f'method="{method}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(service.metrics_url).text.splitlines()
        if line.startswith("imagemesh_grpc_requests_total{") and pattern in line and f'code="{code}"' in line
    )


@pytest.mark.parametrize("name", ABANDONED_STREAMS)
def test_a_stream_its_client_abandons_is_counted_cancelled_and_logs_no_error(mesh, photo, name):
    service = mesh[name]
    path, step = ABANDONED_STREAMS[name]
    method = path.rsplit("/", 1)[1]
    image = np.tile(photo, (4, 4, 1))
    edge = 64
    height, width = image.shape[:2]
    abandoned = threading.Event()

    def requests():  # half the image, then nothing until the client has gone
        header = wire.header(width, height, "RGB", image.dtype, tile_width=edge, tile_height=edge)
        yield pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(image=header, steps=[step]))
        rects = list(grid(width, height, edge, edge))
        for rect in rects[: len(rects) // 2]:
            yield pipeline_pb2.StreamRequest(tile=wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]))
        abandoned.wait(30)

    cancelled_before = requests_total(service, method, "CANCELLED")
    with grpc.insecure_channel(service.address) as channel:
        call = channel.stream_stream(
            path,
            request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString,
        )(requests(), timeout=60)
        assert next(call).WhichOneof("part") == "result"
        call.cancel()
        abandoned.set()
    deadline = time.monotonic() + 15
    while in_flight(service) or requests_total(service, method, "CANCELLED") == cancelled_before:
        assert time.monotonic() < deadline, "the abandoned stream was not counted as cancelled"
        time.sleep(0.1)
    time.sleep(0.5)  # an error from closing the stream would be logged right after
    assert "Traceback" not in service.logs()
