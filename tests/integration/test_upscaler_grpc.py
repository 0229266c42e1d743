"""The upscaler over real gRPC on loopback."""

import itertools
import signal
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagemesh.v1 import common_pb2, pipeline_pb2, upscaler_pb2_grpc

from services.common import wire
from services.common.errors import ERROR_TRAILER
from services.common.tiles import MAX_TILE_BYTES, Rect, grid
from services.upscaler.models import ModelRegistry
from support.clients import collect
from support.processes import EXACT_UPSCALER, start_upscaler


@pytest.fixture(scope="module")
def stub(upscaler):
    with grpc.insecure_channel(upscaler.address) as channel:
        yield upscaler_pb2_grpc.UpscalerStub(channel)


def requests_for(image, mode, *, scale=4.0, model="auto", tile_size=0, edge=32, pause=None):
    """Start message then tiles; `pause(index)` may block between tiles."""
    height, width = image.shape[:2]
    header = wire.header(width, height, mode, image.dtype, tile_width=edge, tile_height=edge)
    yield start_message(header, pipeline_pb2.UpscaleOptions(model=model, scale=scale, tile_size=tile_size))
    for index, rect in enumerate(grid(width, height, edge, edge)):
        if pause:
            pause(index)
        yield pipeline_pb2.StreamRequest(tile=wire.tile(rect, image[rect.y0 : rect.y1, rect.x0 : rect.x1]))


def start_message(header, options):
    return pipeline_pb2.StreamRequest(
        start=pipeline_pb2.StreamStart(image=header, steps=[pipeline_pb2.Step(upscale=options)])
    )


def error_detail(exc: grpc.RpcError) -> common_pb2.ErrorDetail:
    detail = common_pb2.ErrorDetail()
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_TRAILER:
            detail.ParseFromString(value)
    return detail


def test_health_and_reflection(upscaler):
    with grpc.insecure_channel(upscaler.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "imagemesh.v1.Upscaler", "liveness"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"imagemesh.v1.Upscaler", "grpc.health.v1.Health"} <= names
    from services.common.healthcheck import main as healthcheck

    assert healthcheck(["grpc", upscaler.address, "imagemesh.v1.Upscaler"]) == 0
    assert healthcheck(["grpc", upscaler.address, "imagemesh.v1.NoSuchService"]) == 1


def test_list_models_reports_readiness_backend_and_reasons(stub):
    reply = stub.ListModels(common_pb2.ListModelsRequest())
    models = {m.name: m for m in reply.models}
    assert reply.default_model == "realesr-general-x4v3"
    general = models["realesr-general-x4v3"]
    # The backend is whatever calibration measured best on this CPU: exactly one chosen, eligible candidate.
    chosen = [c for c in general.calibration if c.chosen]
    assert general.ready and len(chosen) == 1 and chosen[0].backend == general.backend and chosen[0].eligible
    assert general.preferred_tile == chosen[0].tile > 0  # and the tile it was fastest at on this CPU
    assert models["lanczos"].ready and models["lanczos"].backend == "lanczos"
    assert (
        not models["RealESRGAN_x4plus"].ready
        and "RealESRGAN_x4plus.pth" in models["RealESRGAN_x4plus"].not_ready_reason
    )
    assert models["RealESRGAN_x4plus"].sha256.startswith("4fa0d389")
    assert all(m.license for m in reply.models)


def test_output_streams_before_the_last_input_tile_and_equals_the_engine(stub, model_dir, photo):
    first_output = threading.Event()
    waited = []

    def pause(index):  # after the first two tile rows, wait for output to come back
        if index == 8:
            waited.append(first_output.wait(timeout=60))

    replies = stub.Upscale(requests_for(photo, "RGB", tile_size=32, pause=pause), timeout=120)

    def flag(replies):
        for reply in replies:
            if reply.WhichOneof("part") == "tile":
                first_output.set()
            yield reply

    result, summary, tiles, out = collect(flag(replies))
    assert waited == [True], "no output tile came back before the input was complete"
    report = result.steps[0]
    assert (report.name, result.image.width, result.image.height) == ("realesr-general-x4v3", 512, 384)
    chosen = {m.name: m.backend for m in stub.ListModels(common_pb2.ListModelsRequest()).models}
    assert report.backend == chosen["realesr-general-x4v3"]
    assert summary.steps[0].tiles == int(report.details["tiles_total"]) == 12
    assert summary.steps[0].compute_ms > 0
    # What the server measured best, at the tile asked for (so not timed here).
    registry = ModelRegistry(model_dir, threads=2, backend=report.backend, tile=32)
    registry.load_all()
    expected = registry.resolve("auto").engine.upscale(photo, "RGB", 4)
    assert np.array_equal(out, expected)


def test_16bit_rgba_messages_stay_under_the_cap(stub):
    image = np.random.default_rng(3).integers(0, 65536, (40, 72, 4), dtype=np.uint16)
    result, _, tiles, out = collect(
        stub.Upscale(requests_for(image, "RGBA", model="lanczos", edge=64, scale=8), timeout=60)
    )
    assert out.dtype == np.uint16 and out.shape == (320, 576, 4)
    assert result.image.sample_type == common_pb2.SAMPLE_TYPE_UINT16
    assert max(t.ByteSize() for t in tiles) <= MAX_TILE_BYTES + 1024


@pytest.mark.parametrize(
    "kwargs, code, reason",
    [
        (dict(scale=0), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
        (dict(scale=9), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
        (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "model_not_found"),
        (dict(model="RealESRGAN_x4plus"), grpc.StatusCode.FAILED_PRECONDITION, "model_not_ready"),
    ],
)
def test_option_errors(stub, photo, kwargs, code, reason):
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Upscale(requests_for(photo, "RGB", **kwargs), timeout=30))
    assert info.value.code() == code
    assert error_detail(info.value).reason == reason


def test_stream_errors(stub):
    image = np.zeros((40, 40, 3), np.uint8)
    header = wire.header(40, 40, "RGB", np.uint8, tile_width=32, tile_height=32)
    start = start_message(header, pipeline_pb2.UpscaleOptions(scale=2, model="lanczos"))
    good_tile = pipeline_pb2.StreamRequest(tile=wire.tile(Rect(0, 0, 32, 32), image[:32, :32]))
    bad_bytes = pipeline_pb2.StreamRequest(tile=common_pb2.Tile(x=0, y=0, width=32, height=32, pixels=b"123"))
    huge = start_message(
        wire.header(100000, 100000, "RGB", np.uint8, tile_width=32, tile_height=32),
        pipeline_pb2.UpscaleOptions(scale=2),
    )
    no_steps = pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(image=header))
    wrong_step = pipeline_pb2.StreamRequest(
        start=pipeline_pb2.StreamStart(
            image=header, steps=[pipeline_pb2.Step(effect=pipeline_pb2.EffectOptions(effect="sepia"))]
        )
    )
    cases = [
        ([good_tile], grpc.StatusCode.INVALID_ARGUMENT, "must begin"),
        ([start, bad_bytes], grpc.StatusCode.INVALID_ARGUMENT, "bytes of pixels"),
        ([start, good_tile], grpc.StatusCode.INVALID_ARGUMENT, "3 input tiles missing"),
        ([start, good_tile, good_tile], grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
        ([huge], grpc.StatusCode.OUT_OF_RANGE, "limit"),
        ([no_steps], grpc.StatusCode.INVALID_ARGUMENT, "at least one step"),
        ([wrong_step], grpc.StatusCode.INVALID_ARGUMENT, "must be an upscale step"),
    ]
    for messages, code, text in cases:
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Upscale(iter(messages), timeout=30))
        assert info.value.code() == code and text in info.value.details(), info.value.details()


def test_metrics_move_after_a_request(upscaler, stub, photo):
    def tiles_done():
        text = httpx.get(upscaler.metrics_url).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("imagemesh_tiles_processed_total{")
        )

    before = tiles_done()
    collect(stub.Upscale(requests_for(photo[:32, :32], "RGB", model="lanczos"), timeout=30))
    assert tiles_done() == before + 1
    text = httpx.get(upscaler.metrics_url).text
    for name in (
        "imagemesh_grpc_requests_total",
        "imagemesh_grpc_request_duration_seconds_bucket",
        "imagemesh_grpc_requests_in_flight",
        "imagemesh_queue_depth",
        "imagemesh_inference_seconds_bucket",
        "imagemesh_model_ready",
    ):
        assert name in text


def answers(health) -> bool:
    try:
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return True
    except grpc.RpcError:
        return False


def test_concurrency_limit_then_graceful_drain(tmp_path_factory, model_dir):
    """One slot, no queue: a second call is RESOURCE_EXHAUSTED. Then SIGTERM
    mid-stream: the open stream still completes, new calls are refused."""
    service = start_upscaler(
        tmp_path_factory,
        model_dir,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUED_REQUESTS="0",
        DRAIN_SECONDS="30",
        **EXACT_UPSCALER,
    )
    image = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    release = threading.Event()
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = upscaler_pb2_grpc.UpscalerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            held = stub.Upscale(
                requests_for(image, "RGB", model="lanczos", pause=lambda i: i == 2 and release.wait(60)), timeout=90
            )
            first = next(held)
            assert first.WhichOneof("part") == "result"  # the slot is taken
            with pytest.raises(grpc.RpcError) as info:
                collect(stub.Upscale(requests_for(image, "RGB", model="lanczos"), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            service.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while answers(health):  # draining: NOT_SERVING, then no new calls at all
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:
                collect(stub.Upscale(requests_for(image, "RGB", model="lanczos"), timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            release.set()
            _, summary, _, out = collect(itertools.chain([first], held))
            assert summary.steps[0].tiles == 1 and out.shape == (256, 256, 3)
        assert service.process.wait(timeout=30) == 0
        assert '"msg": "draining"' in service.logs()
    finally:
        release.set()
        service.stop()
