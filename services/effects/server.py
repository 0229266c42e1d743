"""The effects service's gRPC face."""

from __future__ import annotations

import contextlib
from typing import AsyncIterable, AsyncIterator

import grpc
import numpy as np
from imagemesh.v1 import effects_pb2, effects_pb2_grpc, pipeline_pb2

from services.common import metrics
from services.common.errors import InvalidArgument
from services.common.server import ServiceRuntime, rpc
from services.common.streaming import Downstreams, StepPlan, check_output_size, serve_stream
from services.common.tiles import Rect, grid
from services.common.wire import HeaderInfo

from . import engine, registry
from .config import EffectsConfig


class EffectsOp:
    """A chain of effects as a streamed tile operation."""

    def __init__(self, chain: engine.Chain, tile: int):
        self.chain = chain
        self.whole_image = chain.whole_image
        self.out_width, self.out_height = chain.width * chain.scale, chain.height * chain.scale
        self.out_mode, self.out_dtype = chain.out_mode, chain.out_dtype
        # Whole-image chains render output cells from a finished result; tileable ones render input tiles.
        self.jobs = (
            grid(self.out_width, self.out_height, tile, tile)
            if self.whole_image
            else grid(chain.width, chain.height, tile, tile)
        )
        self.preferred_cell = tile
        self._result: np.ndarray | None = None

    def context_rect(self, job: Rect) -> Rect:
        return job.expand(self.chain.halo, self.chain.width, self.chain.height)

    def output_rect(self, job: Rect) -> Rect:
        return job

    def prepare(self, whole: np.ndarray) -> None:
        self._result = self.chain.apply(whole, engine.Origin(0, 0, self.chain.width, self.chain.height))

    def render(self, job: Rect, context: np.ndarray) -> np.ndarray:
        if self.whole_image:
            if self._result is None:
                raise RuntimeError("render() before prepare() on a whole-image effect")
            return self._result[job.y0 : job.y1, job.x0 : job.x1]
        around = self.context_rect(job)
        out = self.chain.apply(context, engine.Origin(around.x0, around.y0, self.chain.width, self.chain.height))
        return out[job.relative_to(around)]


def effect_info(effect: registry.Effect) -> effects_pb2.EffectInfo:
    defaults = {p.name: p.default for p in effect.params}, {c.name: c.default for c in effect.choices}
    return effects_pb2.EffectInfo(
        name=effect.name,
        description=effect.description,
        whole_image=effect.whole_image(*defaults),
        params=[
            effects_pb2.EffectParameter(
                name=p.name,
                default=p.default,
                minimum=p.minimum,
                maximum=p.maximum,
                description=p.description,
                integer=p.integer,
            )
            for p in effect.params
        ],
        options=[
            effects_pb2.EffectChoice(name=c.name, default=c.default, values=list(c.values), description=c.description)
            for c in effect.choices
        ],
    )


class EffectsServicer(effects_pb2_grpc.EffectsServicer):
    def __init__(self, runtime: ServiceRuntime[EffectsConfig]):
        self.runtime = runtime
        self.downstreams = Downstreams(runtime.config.addresses)

    @rpc()
    async def ListEffects(
        self, request: effects_pb2.ListEffectsRequest, context: grpc.aio.ServicerContext
    ) -> effects_pb2.ListEffectsResponse:
        return effects_pb2.ListEffectsResponse(effects=[effect_info(e) for e in registry.EFFECTS.values()])

    def plan_step(self, start: pipeline_pb2.StreamStart, info: HeaderInfo) -> StepPlan:
        chain_steps = []
        scale = 1
        for index, step in enumerate(start.steps):
            if step.WhichOneof("op") != "effect":
                break
            effect = registry.get(step.effect.effect)
            params, options = effect.resolve(dict(step.effect.params), dict(step.effect.options))
            scale *= effect.scale(params, options)  # each step's size, before anything is built for it
            check_output_size(
                info.width * scale,
                info.height * scale,
                self.runtime.config.max_output_pixels,
                f"step {index + 1} ({effect.name})",
            )
            chain_steps.append(engine.ChainStep(effect, params, options))
        if not chain_steps:
            raise InvalidArgument("the first step sent to the effects service must be an effect step", field="steps")
        chain = engine.Chain(chain_steps, info.width, info.height, info.mode, info.dtype)
        name = "+".join(s.effect.name for s in chain_steps)
        report = pipeline_pb2.StepReport(
            op="effect",
            name=name,
            backend="numpy",
            service="effects",
            details={
                "halo": str(chain.halo),
                "whole_image": str(chain.whole_image).lower(),
                **{f"{s.effect.name}.{k}": f"{v:g}" for s in chain_steps for k, v in s.params.items()},
                **{f"{s.effect.name}.{k}": v for s in chain_steps for k, v in s.options.items()},
            },
        )
        tiles = metrics.TILES.labels("effects", name, "numpy")
        seconds = metrics.INFERENCE_SECONDS.labels("effects", name, "numpy")

        def observe(elapsed: float) -> None:
            tiles.inc()
            seconds.observe(elapsed)

        return StepPlan(
            EffectsOp(chain, self.runtime.config.effects_tile_size),
            report,
            steps_used=len(chain_steps),
            observe=observe,
        )

    @rpc()
    async def ApplyEffects(
        self, request_iterator: AsyncIterable[pipeline_pb2.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pipeline_pb2.StreamResponse]:
        async with contextlib.aclosing(serve_stream(self, request_iterator, context, method="ApplyEffects")) as replies:
            async for reply in replies:
                yield reply
