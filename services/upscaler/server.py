"""The upscaler's gRPC face: validate, plan, and run the shared tile stream."""

from __future__ import annotations

import contextlib
import math
from typing import AsyncIterable, AsyncIterator

import grpc
import numpy as np
from imagemesh.v1 import common_pb2, pipeline_pb2, upscaler_pb2_grpc

from services.common import metrics
from services.common.contract import MAX_SCALE, MAX_TILE_HALO, MAX_TILE_SIZE, MIN_SCALE, MIN_TILE_SIZE
from services.common.errors import InvalidArgument
from services.common.server import ServiceRuntime, rpc
from services.common.streaming import Downstreams, StepPlan, serve_stream
from services.common.tiles import Rect
from services.common.wire import HeaderInfo

from .config import UpscalerConfig
from .engine import Plan, UpscaleEngine
from .lanes import ReadyTiles
from .models import ModelRegistry


def validate_options(options: pipeline_pb2.UpscaleOptions) -> None:
    scale = options.scale
    if not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
        raise InvalidArgument(f"scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {scale:g}", field="scale")
    if options.tile_size and not MIN_TILE_SIZE <= options.tile_size <= MAX_TILE_SIZE:
        raise InvalidArgument(
            f"tile_size must be 0 (automatic) or between {MIN_TILE_SIZE} and {MAX_TILE_SIZE}", field="tile_size"
        )
    if options.tile_halo > MAX_TILE_HALO:
        raise InvalidArgument(f"tile_halo must be at most {MAX_TILE_HALO}", field="tile_halo")


class UpscaleOp:
    """An upscale plan as a streamed tile operation."""

    whole_image = False

    def __init__(self, engine: UpscaleEngine, plan: Plan, mode: str, dtype: np.dtype, alpha_through_model: bool):
        self.engine, self.plan, self.mode, self.alpha_through_model = engine, plan, mode, alpha_through_model
        self.out_width, self.out_height, self.out_mode, self.out_dtype = plan.out_width, plan.out_height, mode, dtype
        self.jobs = plan.tiles
        self.preferred_cell = max(16, int(plan.tile * plan.scale))
        self.tiles_together = engine.tiles_together
        self._ready = ReadyTiles(engine.lanes)

    def context_rect(self, job: Rect) -> Rect:
        return self.plan.context_rect(job)

    def output_rect(self, job: Rect) -> Rect:
        return self.plan.output_rect(job)

    def prepare(self, whole: np.ndarray) -> None:
        pass

    def render(self, job: Rect, context: np.ndarray) -> np.ndarray:
        return self.engine.render(self.plan, job, context, self.mode, self.alpha_through_model)

    def ready(self, jobs: int) -> None:
        self._ready.set(jobs)


class UpscalerServicer(upscaler_pb2_grpc.UpscalerServicer):
    def __init__(self, runtime: ServiceRuntime[UpscalerConfig], registry: ModelRegistry):
        self.runtime = runtime
        self.registry = registry
        self.downstreams = Downstreams(runtime.config.addresses)

    @rpc()
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(**model.info()) for model in self.registry.models.values()],
            default_model=self.registry.default_model(),
        )

    def plan_step(self, start: pipeline_pb2.StreamStart, info: HeaderInfo) -> StepPlan:
        if start.steps[0].WhichOneof("op") != "upscale":
            raise InvalidArgument("the first step sent to the upscaler must be an upscale step", field="steps")
        options = start.steps[0].upscale
        validate_options(options)
        model = self.registry.resolve(options.model)
        plan = model.engine.plan(
            info.width,
            info.height,
            options.scale,
            tile=options.tile_size,
            halo=options.tile_halo,
            concurrency=self.runtime.config.max_concurrent_requests,
        )
        op = UpscaleOp(model.engine, plan, info.mode, info.dtype, options.alpha_mode == pipeline_pb2.ALPHA_MODE_MODEL)
        report = pipeline_pb2.StepReport(
            op="upscale",
            name=model.name,
            backend=model.backend,
            service="upscaler",
            details={
                "scale": f"{options.scale:g}",
                "tile_size": str(plan.tile),
                "tile_halo": str(plan.halo),
                "tiles_total": str(len(plan.tiles)),
                "model_passes": str(plan.passes),
            },
        )
        tiles = metrics.TILES.labels("upscaler", model.name, model.backend)
        seconds = metrics.INFERENCE_SECONDS.labels("upscaler", model.name, model.backend)

        def observe(elapsed: float) -> None:
            tiles.inc()
            seconds.observe(elapsed)

        return StepPlan(op, report, observe=observe)

    @rpc()
    async def Upscale(
        self, request_iterator: AsyncIterable[pipeline_pb2.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pipeline_pb2.StreamResponse]:
        with self.registry.lanes.request():  # how many are in flight sets each network call's threads
            async with contextlib.aclosing(serve_stream(self, request_iterator, context, method="Upscale")) as replies:
                async for reply in replies:
                    yield reply
