"""How long a pipeline should take, from the speeds each service measured at start
(its backend calibration, in GET /v1/models): a job's `eta_seconds` before its first
tile is done, and its progress inside a tile. Steps without a measured speed
(Lanczos, the keyer, effects) take a small share of the time and count as none."""

from __future__ import annotations

from imagemesh.v1 import common_pb2, pipeline_pb2

from services.common.contract import output_size


def chosen_speed(model: common_pb2.ModelInfo) -> float:
    """Input megapixels per second of the backend that serves the model; 0 when not measured."""
    return next((m.megapixels_per_second for m in model.calibration if m.chosen), 0.0)


def _detail(report: pipeline_pb2.StepReport, name: str, default: int) -> int:
    try:
        return int(report.details.get(name, default))
    except ValueError:
        return default


def upscale_seconds(report: pipeline_pb2.StepReport, width: int, height: int, model: common_pb2.ModelInfo) -> float:
    """Every pass of the network over every tile with its halo, at the calibrated speed."""
    speed = chosen_speed(model)
    if not speed or not model.scale:
        return 0.0
    tile, halo = _detail(report, "tile_size", 0) or max(width, height), _detail(report, "tile_halo", 0)
    tile_w, tile_h = min(tile, width), min(tile, height)
    with_halo = (min(tile_w + 2 * halo, width) * min(tile_h + 2 * halo, height)) / (tile_w * tile_h)
    passes = max(1, _detail(report, "model_passes", 1))
    pixels = width * height * with_halo * sum(model.scale ** (2 * k) for k in range(passes))
    return pixels / (speed * 1e6)


def segmentation_seconds(model: common_pb2.ModelInfo) -> float:
    """One run of the model on its fixed-size input."""
    speed = chosen_speed(model)
    return model.input_size**2 / (speed * 1e6) if speed and model.input_size else 0.0


def estimate_seconds(
    width: int, height: int, reports: list[pipeline_pb2.StepReport], models: dict[str, common_pb2.ListModelsResponse]
) -> float:
    by_name = {(service, m.name): m for service, reply in models.items() for m in reply.models}
    total = 0.0
    for report in reports:
        model = by_name.get((report.service, report.name))
        if report.op == "upscale":
            if model is not None:
                total += upscale_seconds(report, width, height, model)
            width, height = output_size(width, height, float(report.details.get("scale", "1") or 1))
        elif report.op == "remove_background" and model is not None:
            total += segmentation_seconds(model)
    return total
