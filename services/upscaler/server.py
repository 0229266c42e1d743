"""The upscaler's gRPC face: validate, plan, stream tiles in and out."""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

from imagemesh.v1 import common_pb2, upscaler_pb2, upscaler_pb2_grpc

from services.common import metrics, wire
from services.common.errors import InvalidArgument, LimitExceeded
from services.common.server import ServiceRuntime, rpc
from services.common.tiles import TileBuffer, split_for_messages

from .engine import MAX_SCALE, MIN_SCALE
from .models import ModelRegistry

MAX_TILE_SIZE = 2048
MAX_HALO = 256


def validate_options(options: upscaler_pb2.UpscaleOptions) -> None:
    scale = options.scale
    if not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
        raise InvalidArgument(f"scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale:g}", field="scale")
    if options.tile_size and not 16 <= options.tile_size <= MAX_TILE_SIZE:
        raise InvalidArgument(f"tile_size must be 0 (automatic) or between 16 and {MAX_TILE_SIZE}", field="tile_size")
    if options.tile_halo > MAX_HALO:
        raise InvalidArgument(f"tile_halo must be at most {MAX_HALO}", field="tile_halo")


class UpscalerServicer(upscaler_pb2_grpc.UpscalerServicer):
    def __init__(self, runtime: ServiceRuntime, registry: ModelRegistry):
        self.runtime = runtime
        self.registry = registry
        self.executor = ThreadPoolExecutor(max_workers=runtime.config.max_concurrent_requests,
                                           thread_name_prefix="upscale")

    @rpc()
    async def ListModels(self, request, context):
        return upscaler_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(**model.info()) for model in self.registry.models.values()],
            default_model=self.registry.default_model())

    @rpc(limited=True)
    async def Upscale(self, request_iterator, context):
        started = time.perf_counter()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "start":
            raise InvalidArgument("the stream must begin with an UpscaleStart message", field="start")
        options = first.start.options
        validate_options(options)
        config = self.runtime.config
        info = wire.HeaderInfo(first.start.image, config.max_input_pixels)
        model = self.registry.resolve(options.model)
        engine = model.engine
        plan = engine.plan(info.width, info.height, options.scale, tile=options.tile_size, halo=options.tile_halo,
                           concurrency=config.max_concurrent_requests)
        if plan.out_width * plan.out_height > config.max_output_pixels:
            raise LimitExceeded(f"the output would be {plan.out_width}x{plan.out_height} = "
                                f"{plan.out_width * plan.out_height} pixels; the limit is {config.max_output_pixels}",
                                reason="output_too_large", field="scale")
        buffer = TileBuffer(info.width, info.height, info.channels, info.dtype,
                            info.msg.tile_width, info.msg.tile_height)
        out_header = wire.header(plan.out_width, plan.out_height, info.mode, info.dtype,
                                 icc_profile=info.msg.icc_profile, source_format=info.msg.source_format)
        yield upscaler_pb2.UpscaleResponse(result=upscaler_pb2.UpscaleResult(
            image=out_header, model=model.name, backend=model.backend, scale=options.scale,
            tile_size=plan.tile, tile_halo=plan.halo, tiles_total=len(plan.tiles)))

        alpha_through_model = options.alpha_mode == upscaler_pb2.ALPHA_MODE_MODEL
        bytes_per_pixel = info.channels * info.dtype.itemsize
        pending = list(plan.tiles)
        inference_seconds = 0.0
        loop = asyncio.get_running_loop()
        tiles_metric = metrics.TILES.labels("upscaler", model.name, model.backend)
        seconds_metric = metrics.INFERENCE_SECONDS.labels("upscaler", model.name, model.backend)
        async for message in request_iterator:
            if message.WhichOneof("part") != "tile":
                raise InvalidArgument("only tiles may follow the UpscaleStart message", field="tile")
            buffer.add(*wire.tile_pixels(message.tile, info))
            for rect in [r for r in pending if buffer.covers(plan.context_rect(r))]:
                tile_started = time.perf_counter()
                out = await loop.run_in_executor(
                    self.executor, engine.render, plan, rect, buffer.read(plan.context_rect(rect)), info.mode,
                    alpha_through_model)
                elapsed = time.perf_counter() - tile_started
                inference_seconds += elapsed
                seconds_metric.observe(elapsed)
                tiles_metric.inc()
                pending.remove(rect)
                target = plan.output_rect(rect)
                for part in split_for_messages(target, bytes_per_pixel):
                    yield upscaler_pb2.UpscaleResponse(tile=wire.tile(part, out[part.relative_to(target)]))
            buffer.release([plan.context_rect(r) for r in pending])
        if pending:
            raise InvalidArgument(f"the stream ended with {buffer.missing} input tiles missing", field="tile")
        yield upscaler_pb2.UpscaleResponse(summary=upscaler_pb2.UpscaleSummary(
            tiles_done=len(plan.tiles), inference_ms=inference_seconds * 1000,
            total_ms=(time.perf_counter() - started) * 1000))
