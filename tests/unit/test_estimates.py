"""A job's estimate, progress and time left, computed from its plan and measured speeds."""

import pytest
from imagemesh.v1 import common_pb2, pipeline_pb2

from services.gateway.estimate import estimate_seconds
from services.gateway.jobs import Job


def test_eta_and_progress_inside_a_tile_follow_the_expected_length():
    job = Job("j", "r", estimated_seconds=10.0)
    assert job.timing(now=100.0) == (0.0, 10.0)  # queued: its run's estimate
    job.status, job.started, job.tiles_total = "running", 100.0, 1
    assert job.timing(now=104.0) == (0.4, 6.0)  # one tile, nothing done yet: moves with the time
    assert job.timing(now=130.0) == (0.99, 0.0)  # longer than expected: never done before it is
    job.tiles_total, job.tiles_done, job.tiles_at = 4, 1, 102.0  # a tile in 2 s: 8 s in all, not 10
    assert job.timing(now=104.0) == (0.4, 4.0)  # the time left from the tiles, the fraction never back
    job.tiles_done, job.tiles_at = 3, 105.0
    assert job.timing(now=105.0) == (0.75, 1.67)  # ahead of the estimate: the tiles lead
    unknown = Job("k", "r", status="running", started=100.0, tiles_total=2)
    assert unknown.timing(now=105.0) == (0.0, None)  # no speeds measured, no tile done: no estimate
    job.status = "done"
    assert job.timing(now=200.0) == (1.0, 0.0)


def test_the_estimate_counts_every_pass_and_halo_at_the_measured_speed():
    def model(name, speed, scale=0.0, input_size=0):
        return common_pb2.ModelInfo(
            name=name,
            scale=scale,
            input_size=input_size,
            calibration=[
                common_pb2.BackendMeasurement(backend="slow", megapixels_per_second=speed / 10),
                common_pb2.BackendMeasurement(backend="fast", megapixels_per_second=speed, chosen=True),
            ],
        )

    models = {
        "upscaler": common_pb2.ListModelsResponse(models=[model("x4", 0.5, scale=4)]),
        "bgremoval": common_pb2.ListModelsResponse(models=[model("u2netp", 0.1024, input_size=320)]),
    }
    cut = pipeline_pb2.StepReport(op="remove_background", name="u2netp", service="bgremoval")
    up = pipeline_pb2.StepReport(
        op="upscale",
        name="x4",
        service="upscaler",
        details={"scale": "4", "tile_size": "100", "tile_halo": "10", "model_passes": "1"},
    )
    # 1000x500 in 100-pixel tiles with a 10-pixel halo: 1.44x the pixels, at 0.5 MP/s; the cut-out one 320x320 run
    assert estimate_seconds(1000, 500, [cut, up], models) == pytest.approx(1.0 + 0.5 * 1.44 / 0.5)
    two_passes = pipeline_pb2.StepReport(
        op="upscale",
        name="x4",
        service="upscaler",
        details={"scale": "16", "tile_size": "0", "tile_halo": "0", "model_passes": "2"},
    )
    assert estimate_seconds(100, 100, [two_passes], models) == pytest.approx(0.01 * 17 / 0.5)
    lanczos = pipeline_pb2.StepReport(op="upscale", name="lanczos", service="upscaler", details={"scale": "2"})
    assert estimate_seconds(100, 100, [lanczos], models) == 0.0  # nothing measured: no time counted
