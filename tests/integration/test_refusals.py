"""Requests the mesh refuses: refused at once, with the right status, and leaving
nothing behind (no task, no log line under another request's id)."""

import json
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from imagemesh.v1 import pipeline_pb2

from services.common import wire
from services.common.tiles import Rect
from support.clients import effects_stream
from support.images import png
from support.processes import start_gateway, start_service

# Each is refused by a service at stream start; the status the gateway answers.
REFUSED = [
    ("/v1/upscale", {"scale": "20"}, 400),
    ("/v1/upscale", {"model": "no-such-model"}, 404),
    ("/v1/upscale", {"model": "RealESRGAN_x4plus"}, 503),  # known, its file is absent: not ready
    ("/v1/effects", {"effect": "no-such-effect"}, 400),
    ("/v1/effects", {"effect": "sepia", "strength": "7"}, 400),
    ("/v1/process", {"steps": json.dumps([{"op": "upscale", "scale": 2}, {"op": "effect", "effect": "nope"}])}, 400),
]


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory, mesh, mesh_ports):
    """A gateway of this module's own, so that its log holds only these requests."""
    service = start_gateway(tmp_path_factory, mesh_ports, RATE_LIMIT_PER_MINUTE="0")
    yield service
    service.stop()


def test_refused_streams_leave_no_task_and_no_error_in_the_log(own_gateway, photo):
    data = png(photo[:32, :32])
    with httpx.Client(base_url=own_gateway.url, timeout=60) as client:
        for round_ in range(3):
            for path, fields, status in REFUSED:
                reply = client.post(
                    path,
                    files={"file": ("p.png", data)},
                    data=fields,
                    headers={"X-Request-ID": f"refused-{round_}-{status}"},
                )
                assert reply.status_code == status, (path, fields, reply.text)
                assert reply.json()["error"]["request_id"] == f"refused-{round_}-{status}"
        time.sleep(1.5)  # the leaked tasks were collected about a second later
        for index in range(3):  # requests that succeed, under ids of their own, while collection runs
            reply = client.post(
                "/v1/effects",
                files={"file": ("p.png", data)},
                data={"effect": "invert"},
                headers={"X-Request-ID": f"fine-{index}"},
            )
            assert reply.status_code == 200
        time.sleep(1.0)
    records = [json.loads(line) for line in own_gateway.logs().splitlines() if line.startswith("{")]
    problems = [r for r in records if r["level"] in ("error", "critical")]
    assert not problems, problems
    assert "Task was destroyed" not in own_gateway.logs()
    for record in records:  # every request line carries its own request's id
        if record["msg"] == "request" and record["path"] != "/healthz":
            assert record.get("request_id", "").startswith(("refused-", "fine-")), record


def ended_after(service, requests):
    """How the effects service ended a stream of `requests`, and after how long."""
    with grpc.insecure_channel(service.address) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            list(effects_stream(channel)(requests, timeout=300))
        return ended, time.monotonic() - started


def test_a_stream_that_never_sends_its_start_is_refused_after_the_start_timeout(tmp_path_factory, model_dir):
    service = start_service("effects", tmp_path_factory, model_dir, STREAM_START_TIMEOUT_SECONDS="1")
    release = threading.Event()

    def silent():  # opens the stream, then sends nothing until released
        release.wait(60)
        yield from ()

    try:
        refused, waited = ended_after(service, silent())
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "StreamStart" in refused.value.details()
        assert waited < 30, f"held {waited:.0f} s, not the configured 1 s"
    finally:
        release.set()
        service.stop()


# Chains a service refuses before running, wherever the refusing step stands in the chain.
CHAIN_REFUSALS = [
    ([{"op": "upscale", "scale": 20}], 400),
    ([{"op": "effect", "effect": "no-such-effect"}], 400),
    ([{"op": "upscale", "model": "no-such-model"}], 404),
    ([{"op": "upscale", "model": "RealESRGAN_x4plus"}], 503),
    ([{"op": "effect", "effect": "sepia"}, {"op": "upscale", "scale": 20}], 400),
    (
        [{"op": "remove_background", "model": "keyer"}, {"op": "effect", "effect": "sepia", "params": {"strength": 9}}],
        400,
    ),
    (
        [
            {"op": "upscale", "scale": 8},
            {"op": "effect", "effect": "invert"},
            {"op": "upscale", "scale": 8},
            {"op": "effect", "effect": "invert"},
            {"op": "upscale", "scale": 2},
        ],
        413,
    ),  # 16384x12288 at the end
]


@pytest.mark.parametrize("steps,status", CHAIN_REFUSALS)
def test_a_job_is_refused_at_submission_for_whatever_process_refuses(http, photo, steps, status):
    files = {"file": ("p.png", png(photo))}
    process = http.post("/v1/process", files=files, data={"steps": json.dumps(steps)})
    job = http.post("/v1/jobs", files=files, data={"steps": json.dumps(steps)})
    assert process.status_code == job.status_code == status, (process.text, job.text)
    assert job.json()["error"]["code"] == process.json()["error"]["code"]


def test_a_stream_that_goes_quiet_after_its_start_is_ended(tmp_path_factory, model_dir):
    service = start_service("effects", tmp_path_factory, model_dir, STREAM_IDLE_TIMEOUT_SECONDS="15")
    release = threading.Event()
    image = np.zeros((32, 32, 3), np.uint8)

    def start_then_nothing():
        header = wire.header(32, 32, "RGB", np.uint8, tile_width=32, tile_height=32)
        yield pipeline_pb2.StreamRequest(
            start=pipeline_pb2.StreamStart(
                image=header, steps=[pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="invert"))]
            )
        )
        release.wait(120)
        yield pipeline_pb2.StreamRequest(tile=wire.tile(Rect(0, 0, 32, 32), image))

    try:
        ended, waited = ended_after(service, start_then_nothing())
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "nothing arrived" in ended.value.details()
        assert waited < 60
    finally:
        release.set()
        service.stop()
