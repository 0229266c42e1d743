"""No request takes a service down: each step's output is checked before any work,
chains through the same service never wait on themselves, hostile values are a
400, bodies, thin images, tiles, idle clients and the gateway's decoded pixels are
all bounded, and what is public shows no server detail."""

import concurrent.futures
import io
import json
import os
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2
from PIL import Image

from services.common import imageio, wire
from services.common.imageio import MAX_ICC_BYTES
from services.common.tiles import grid
from support.clients import effects_stream
from support.images import png
from support.processes import in_flight, start_gateway


def rss_mb(service) -> float:
    for line in open(f"/proc/{service.process.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


POPART_GROWTH = [{"op": "effect", "effect": "popart", "params": {"grid": "2x2"}}] * 16


@pytest.mark.parametrize("route", ["/v1/process", "/v1/jobs"])
def test_a_chain_growing_past_the_output_limit_is_refused_before_any_work(http, mesh, photo, route):
    """Sixteen 2x2 pop-art grids double both sides sixteen times: 413 at once, memory unmoved."""
    before = rss_mb(mesh["effects"])
    started = time.monotonic()
    reply = http.post(
        route,
        files={"file": ("p.png", png(np.ascontiguousarray(photo[:64, :64])))},
        data={"steps": json.dumps(POPART_GROWTH)},
        timeout=60,
    )
    assert reply.status_code == 413, reply.text
    assert "limit" in reply.json()["error"]["message"] and "step 8" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 30
    assert rss_mb(mesh["effects"]) - before < 50
    assert http.post("/v1/effects", files={"file": ("p.png", png(photo))}, data={"effect": "invert"}).status_code == 200


UPSCALE_1 = {"op": "upscale", "scale": 1, "model": "lanczos"}
KEYER = {"op": "remove_background", "model": "keyer"}
INVERT = {"op": "effect", "effect": "invert"}
CHAINS = {
    "ten hops on the upscaler": [UPSCALE_1] * 10,
    "ten hops on background removal": [KEYER] * 10,
    "upscale, effect, upscale, effect, upscale": [UPSCALE_1, INVERT, UPSCALE_1, INVERT, UPSCALE_1],
    "alternating over all three, twelve steps": [UPSCALE_1, INVERT, KEYER] * 4,
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_through_the_same_service_never_wait_on_themselves(http, photo, name):
    """With two compute slots per service, three or more hops of one request on one
    service used to wait for each other for ever; four such requests at once now."""
    data = png(np.ascontiguousarray(photo[:48, :64]))

    def one(_):
        return http.post(
            "/v1/process", files={"file": ("p.png", data)}, data={"steps": json.dumps(CHAINS[name])}, timeout=120
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert codes == [200] * 4, codes  # four requests are well within a service's open limit (18)


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize(
    "case",
    [
        dict(json={"image_base64": "AA==", "steps": "x"}, raw='{"steps": ' + DEEP + "}"),
        dict(data={"steps": DEEP}),
        dict(data={"effect": "sepia", "params": DEEP}, route="/v1/effects"),
        dict(data={"effects": DEEP}, route="/api/v2/process"),
        dict(data={"effects": '["sepia"]', "effect_params": '{"sepia": ' + DEEP + "}"}, route="/api/v2/process"),
        dict(data={"models": DEEP}, route="/v1/remove-background"),
        dict(raw_json='{"scale": 4, "tile": ' + "9" * 4000 + ', "image_base64": "AA=="}', route="/v1/upscale"),
        dict(data={"tile": "9" * 4000}, route="/v1/upscale"),
        dict(data={"image_url": "http://[::1/"}, route="/v1/upscale", no_file=True),
    ],
    ids=["json-body", "steps", "params", "effects", "effect_params", "models", "json-int", "form-int", "bad-url"],
)
def test_hostile_values_are_a_400_with_a_json_body(http, photo, case):
    route = case.get("route", "/v1/process")
    if "raw" in case or "raw_json" in case:
        body = case.get("raw") or case["raw_json"]
        reply = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        files = None if case.get("no_file") else {"file": ("p.png", png(photo[:16, :16]))}
        reply = http.post(route, files=files, data=case["data"])
    assert reply.status_code == 400, reply.text[:300]
    assert reply.json()["error"]["code"] in ("invalid_argument", "url_not_allowed")


@pytest.mark.parametrize("request_id", ["caf\xe9", "a\x7fb", "\x01", "x" * 65, "a b"])
def test_an_unsafe_request_id_is_replaced_not_echoed(http, photo, request_id):
    reply = http.post(
        "/v1/effects",
        files={"file": ("p.png", png(photo[:16, :16]))},
        data={"effect": "invert"},
        headers=[(b"x-request-id", request_id.encode("latin-1"))],
    )
    assert reply.status_code == 200
    echoed = reply.headers["x-request-id"]
    assert echoed != request_id and len(echoed) == 32 and echoed.isalnum()


@pytest.mark.parametrize("field", ["model", "bgcolor"])
def test_a_long_value_is_a_400_quoting_a_short_prefix(http, photo, field):
    route = "/v1/upscale" if field == "model" else "/v1/remove-background"
    reply = http.post(
        route,
        files={"file": ("p.png", png(photo[:16, :16]))},
        data={field: "z" * 10000, **({"model": "keyer"} if field == "bgcolor" else {})},
    )
    assert reply.status_code in (400, 404), reply.text[:300]
    assert len(reply.json()["error"]["message"]) < 1100 and "z" * 100 not in reply.json()["error"]["message"]


@pytest.mark.parametrize("extra", [16, 2 << 20])
def test_an_icc_profile_over_the_limit_is_a_413(http, extra):

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG", icc_profile=os.urandom(MAX_ICC_BYTES + extra))
    reply = http.post("/v1/effects", files={"file": ("p.png", out.getvalue())}, data={"effect": "invert"})
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "icc_profile_too_large"


def thin_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(
        np.tile(np.arange(256, dtype=np.uint8), -(-width * height // 256))[: width * height].reshape(height, width)
    ).save(out, "PNG")
    return out.getvalue()


def test_a_thin_image_is_processed_in_linear_time(http):
    """1x1000000 took 104 s when every tile rescanned every pending job; within one minute now."""
    reply = http.post(
        "/v1/effects",
        files={"file": ("thin.png", thin_png(1, 1_000_000))},
        data={"effect": "invert", "format": "png"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text[:300]
    out = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert out.shape[:2] == (1_000_000, 1)
    source = np.asarray(Image.open(io.BytesIO(thin_png(1, 1_000_000))))
    assert np.array_equal(out.reshape(-1), 255 - source.reshape(-1))


def test_an_image_beyond_the_tile_count_is_a_413(http):
    reply = http.post(
        "/v1/effects", files={"file": ("thin.png", thin_png(1, 40_000_000))}, data={"effect": "invert"}, timeout=120
    )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "too_many_tiles", reply.text[:300]


def test_tiny_tiles_are_refused_over_grpc(mesh):

    image = np.zeros((64, 64, 3), np.uint8)
    header = wire.header(64, 64, "RGB", np.uint8, tile_width=1, tile_height=1)
    requests = [
        pipeline_pb2.StreamRequest(
            start=pipeline_pb2.StreamStart(
                image=header, steps=[pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="invert"))]
            )
        )
    ]
    requests += [
        pipeline_pb2.StreamRequest(tile=wire.tile(r, image[r.y0 : r.y1, r.x0 : r.x1])) for r in grid(64, 64, 1, 1)
    ]
    with grpc.insecure_channel(mesh["effects"].address) as channel:
        call = effects_stream(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(call(iter(requests[:1]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too small" in refused.value.details()


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory, mesh, mesh_ports):
    """A gateway taking images of 1 MB at most, and abandoning answers nobody reads after 2 s."""
    service = start_gateway(
        tmp_path_factory,
        mesh_ports,
        RATE_LIMIT_PER_MINUTE="0",
        MAX_UPLOAD_BYTES="1000000",
        CLIENT_WRITE_TIMEOUT_SECONDS="2",
    )
    yield service
    service.stop()


def chunks(total: int, prefix: bytes = b"", suffix: bytes = b""):
    yield prefix
    block = b"A" * (1 << 20)
    for _ in range(total // len(block)):
        yield block
    yield suffix


BOUNDARY = "imagemeshboundary"
CHUNKED = {
    "json upscale": ("/v1/upscale", "application/json", b'{"image_base64": "', b'"}'),
    "seed base64": ("/upscale-base64", "application/json", b'{"image_base64": "', b'"}'),
    "multipart": (
        "/v1/upscale",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode(),
        f"\r\n--{BOUNDARY}--\r\n".encode(),
    ),
    "choice": ("/v1/remove-background/choice", "application/json", b'{"request_id": "', b'", "model": "keyer"}'),
}


@pytest.mark.parametrize("name", list(CHUNKED))
def test_a_chunked_body_is_refused_at_the_limit_not_read_whole(small_gateway, name):
    route, content_type, prefix, suffix = CHUNKED[name]
    before = rss_mb(small_gateway)
    try:
        reply = httpx.post(
            f"{small_gateway.url}{route}",
            content=chunks(64 << 20, prefix, suffix),
            headers={"content-type": content_type},
            timeout=60,
        )
        status, code = reply.status_code, reply.json()["error"]["code"]
    except httpx.RemoteProtocolError:  # the server answered and closed while we were still sending
        status, code = 413, "upload_too_large"
    assert (status, code) == (413, "upload_too_large")
    assert rss_mb(small_gateway) - before < 40, "the body was read far past the limit"
    assert httpx.get(f"{small_gateway.url}/healthz").status_code == 200


def test_a_client_that_stops_reading_does_not_hold_the_services(small_gateway, mesh, photo):
    """An 8x answer nobody reads: abandoned after the write timeout, the upscale cancelled."""

    data = png(np.tile(photo, (4, 4, 1)))  # 512x384: a 4096x3072 answer, far more than socket buffers hold
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="p.png"\r\n\r\n'.encode()
        + data
        + f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="scale"\r\n\r\n8\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nlanczos\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="format"\r\n\r\npng\r\n--{BOUNDARY}--\r\n'.encode()
    )
    host, port = small_gateway.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect((host, int(port)))
    try:
        client.sendall(
            f"POST /v1/upscale HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while in_flight(mesh["upscaler"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(4)  # the write timeout (2 s) passes while we read nothing
        while in_flight(mesh["upscaler"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_flight(mesh["upscaler"]) == 0
        # On a fast CPU the upscaler's own part can end before the write timeout runs out: wait for it.
        while "answer abandoned midway" not in small_gateway.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "answer abandoned midway" in small_gateway.logs()
    finally:
        client.close()


def gradient_png16(width: int, height: int) -> bytes:
    """A 16-bit RGBA picture that compresses well: a small upload, a large decoded image."""
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(1, width - 1)).astype(np.uint16)
    pixels = np.broadcast_to(ramp[None, :, None], (height, width, 4)).copy()
    return imageio.encode_png(pixels, "RGBA")


@pytest.fixture(scope="module")
def budget_gateway(tmp_path_factory, mesh, mesh_ports):
    service = start_gateway(
        tmp_path_factory,
        mesh_ports,
        RATE_LIMIT_PER_MINUTE="0",
        GATEWAY_MAX_PIXEL_BYTES=str(256 << 20),
        MAX_CONCURRENT_JOBS="1",
        JOB_QUEUE_SIZE="8",
    )
    yield service
    service.stop()


def held_bytes(gateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics").text
    return float(
        next(line.split()[1] for line in text.splitlines() if line.startswith("imagemesh_gateway_pixel_bytes "))
    )


def test_the_gateway_bounds_the_decoded_pixels_it_holds(budget_gateway):
    url = budget_gateway.url
    too_big = gradient_png16(6000, 6000)  # 288 MB decoded: more than the whole budget
    reply = httpx.post(f"{url}/v1/effects", files={"file": ("a.png", too_big)}, data={"effect": "invert"}, timeout=60)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "too_large_for_gateway"

    data = gradient_png16(1500, 1500)  # 18 MB decoded, as much again for a JPEG answer assembled whole

    def one(_):
        return httpx.post(
            f"{url}/v1/effects",
            files={"file": ("a.png", data)},
            data={"effect": "invert", "format": "jpeg"},
            timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 429} and 200 in codes, codes
    assert all(r.headers.get("retry-after") for r in replies if r.status_code == 429)
    assert held_bytes(budget_gateway) == 0  # every answer's share given back


def test_queued_jobs_hold_no_decoded_pixels(budget_gateway):
    """Slow jobs (a wide blur on 2500x2500, 50 MB decoded) pile up behind one worker:
    the queue keeps their uploads, so memory stays where the running one put it."""
    url = budget_gateway.url
    data = gradient_png16(2500, 2500)
    steps = json.dumps([{"op": "effect", "effect": "blur", "params": {"radius": 20}}])

    def submit() -> str:
        reply = httpx.post(f"{url}/v1/jobs", files={"file": ("a.png", data)}, data={"steps": steps}, timeout=60)
        assert reply.status_code == 202, reply.text
        return reply.json()["id"]

    ids = [submit(), submit()]
    baseline = rss_mb(budget_gateway)  # one job running (its input and output held), one queued
    ids += [submit() for _ in range(6)]
    statuses = [httpx.get(f"{url}/v1/jobs/{i}").json()["status"] for i in ids]
    assert statuses.count("queued") >= 4, statuses  # they really waited
    assert rss_mb(budget_gateway) - baseline < 150, "queued jobs hold their decoded images (6 x 50 MB)"
    deadline = time.monotonic() + 240
    for job_id in ids:
        while httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "done"
    assert held_bytes(budget_gateway) == 0


def test_what_is_public_shows_no_server_detail(tmp_path_factory, mesh, mesh_ports, model_dir):
    guarded = start_gateway(tmp_path_factory, mesh_ports, API_TOKENS="tok")
    try:
        assert httpx.get(f"{guarded.url}/status").status_code == 401
        status = httpx.get(f"{guarded.url}/status", headers={"Authorization": "Bearer tok"})
        assert status.status_code == 200 and "jobs" in status.json()
        for route in ("/v1/models", "/models", "/model-info", "/health"):
            text = httpx.get(f"{guarded.url}{route}").text
            assert str(model_dir) not in text and str(model_dir.resolve()) not in text, route
    finally:
        guarded.stop()
