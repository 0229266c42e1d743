"""The background-removal service's gRPC face."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterable, AsyncIterator

import grpc
import numpy as np
from imagemesh.v1 import bgremoval_pb2, bgremoval_pb2_grpc, common_pb2, pipeline_pb2

from services.common import logs, metrics, wire
from services.common.cache import ResultCache
from services.common.contract import MAX_KEYER_TOLERANCE
from services.common.errors import InvalidArgument, LimitExceeded, ModelNotFound, quoted
from services.common.server import Admission, ServiceRuntime, rpc
from services.common.streaming import (
    Downstreams,
    StepPlan,
    open_stream,
    output_header,
    receive_whole,
    serve_stream,
)
from services.common.tiles import GridAssembler, Rect, grid

from . import engine
from .config import BgRemovalConfig
from .models import Segmenter, SegmenterRegistry
from .store import ChoiceStore

MAX_CANDIDATES = 8


class RemovalOp:
    """Background removal as a streamed whole-image operation: the cut-out is
    computed once (or taken from the cache), then applied cell by cell."""

    whole_image = True

    def __init__(
        self,
        segmenter: Segmenter,
        info: wire.HeaderInfo,
        options: engine.RemovalOptions,
        use_cache: bool,
        cache: ResultCache,
        report: pipeline_pb2.StepReport,
        tile: int,
    ):
        self.segmenter, self.mode, self.options = segmenter, info.mode, options
        self.use_cache, self.cache, self.report = use_cache, cache, report
        self.out_width, self.out_height = info.width, info.height
        self.out_mode, self.out_dtype = engine.output_mode(info.mode, options), info.dtype
        self.jobs = grid(info.width, info.height, tile, tile)
        self.preferred_cell = tile
        self.cutout: engine.Cutout | None = None
        self.compute_ms = 0.0

    def context_rect(self, job: Rect) -> Rect:
        return job

    def output_rect(self, job: Rect) -> Rect:
        return job

    def prepare(self, whole: np.ndarray) -> None:
        started = time.perf_counter()
        key = hashlib.sha256(
            f"{whole.shape}{whole.dtype}{self.mode}|{self.segmenter.name}|{self.options.cache_key()}|".encode()
            + whole.tobytes()
        ).hexdigest()
        self.cutout = self.cache.get(key) if self.use_cache else None
        self.report.cache_hit = self.cutout is not None
        if self.cutout is None:
            self.cutout = engine.compute_cutout(self.segmenter, whole, self.mode, self.options)
            self.cache.put(key, self.cutout)
        self.compute_ms = (time.perf_counter() - started) * 1000

    def render(self, job: Rect, whole: np.ndarray) -> np.ndarray:
        if self.cutout is None:
            raise RuntimeError("render() before prepare()")
        region = (slice(job.y0, job.y1), slice(job.x0, job.x1))
        foreground = self.cutout.foreground
        return engine.cut_out(
            whole[region],
            self.mode,
            self.cutout.mask[region],
            None if foreground is None else foreground[region],
            self.options,
        )


class BackgroundRemovalServicer(bgremoval_pb2_grpc.BackgroundRemovalServicer):
    def __init__(
        self,
        runtime: ServiceRuntime[BgRemovalConfig],
        registry: SegmenterRegistry,
        store: ChoiceStore,
        cache: ResultCache,
    ):
        self.runtime, self.registry, self.store, self.cache = runtime, registry, store, cache
        self.candidate_executor = ThreadPoolExecutor(max_workers=MAX_CANDIDATES, thread_name_prefix="candidate")
        self.downstreams = Downstreams(runtime.config.addresses)

    def removal_options(self, o: pipeline_pb2.RemoveBackgroundOptions, info: wire.HeaderInfo) -> engine.RemovalOptions:
        if o.keyer_tolerance > MAX_KEYER_TOLERANCE:
            raise InvalidArgument(
                f"keyer_tolerance must be between 1 and {MAX_KEYER_TOLERANCE}", field="keyer_tolerance"
            )
        if o.alpha_matting and info.width * info.height > self.runtime.config.bgremoval_matting_max_pixels:
            raise LimitExceeded(
                f"alpha_matting is limited to {self.runtime.config.bgremoval_matting_max_pixels} "
                f"pixels; this image has {info.width * info.height}",
                reason="image_too_large",
                field="alpha_matting",
            )
        return engine.RemovalOptions(
            only_mask=o.only_mask,
            bgcolor=engine.parse_colour(o.bgcolor) if o.bgcolor else None,
            post_process=o.post_process,
            refine=o.refine,
            alpha_matting=o.alpha_matting,
            tolerance=o.keyer_tolerance or engine.DEFAULT_TOLERANCE,
            all_similar=o.keyer_all_similar,
        )

    def make_op(
        self, segmenter: Segmenter, info: wire.HeaderInfo, o: pipeline_pb2.RemoveBackgroundOptions
    ) -> RemovalOp:
        options = self.removal_options(o, info)
        report = pipeline_pb2.StepReport(
            op="remove_background",
            name=segmenter.name,
            backend=segmenter.backend,
            service="bgremoval",
            details={"cache_key": options.cache_key()},
        )
        return RemovalOp(
            segmenter, info, options, not o.bypass_cache, self.cache, report, self.runtime.config.bgremoval_tile_size
        )

    def plan_step(self, start: pipeline_pb2.StreamStart, info: wire.HeaderInfo) -> StepPlan:
        if start.steps[0].WhichOneof("op") != "remove_background":
            raise InvalidArgument("the first step sent to bgremoval must be a remove_background step", field="steps")
        o = start.steps[0].remove_background
        if o.models:
            raise InvalidArgument("several models at once are answered by RemoveBackgroundCandidates", field="models")
        op = self.make_op(self.registry.resolve(o.model), info, o)
        request_id = logs.request_id_var.get()
        tiles = metrics.TILES.labels("bgremoval", op.segmenter.name, op.segmenter.backend)
        seconds = metrics.INFERENCE_SECONDS.labels("bgremoval", op.segmenter.name, op.segmenter.backend)
        prepared = False

        def observe(elapsed: float) -> None:
            nonlocal prepared
            tiles.inc()
            if not prepared:  # the first tile follows the mask: record the model's run once
                prepared = True
                seconds.observe(op.compute_ms / 1000)
                if not op.report.cache_hit:
                    self.store.record_run_later(request_id, op.segmenter.name, op.compute_ms)

        return StepPlan(op, op.report, observe=observe)

    @rpc()
    async def RemoveBackground(
        self, request_iterator: AsyncIterable[pipeline_pb2.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pipeline_pb2.StreamResponse]:
        async with contextlib.aclosing(
            serve_stream(self, request_iterator, context, method="RemoveBackground")
        ) as replies:
            async for reply in replies:
                yield reply

    @rpc()
    async def RemoveBackgroundCandidates(
        self, request_iterator: AsyncIterable[pipeline_pb2.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bgremoval_pb2.CandidateResponse]:
        started = time.perf_counter()
        start, requests = await open_stream(request_iterator, self.runtime.config)
        steps = start.steps
        if len(steps) != 1 or steps[0].WhichOneof("op") != "remove_background":
            raise InvalidArgument("candidates take exactly one remove_background step", field="steps")
        o = steps[0].remove_background
        names = list(o.models)
        if not 1 <= len(names) <= MAX_CANDIDATES or len(set(names)) != len(names):
            raise InvalidArgument(f"models must name 1 to {MAX_CANDIDATES} different models", field="models")
        info = wire.HeaderInfo(start.image, self.runtime.config.max_input_pixels)
        ops = [self.make_op(self.registry.resolve(name), info, o) for name in names]
        admission = self.runtime.limiter.admit("RemoveBackgroundCandidates")
        try:
            async with contextlib.aclosing(self._candidates(requests, info, ops, names, admission, started)) as replies:
                async for reply in replies:
                    yield reply
        finally:
            admission.finish()

    async def _candidates(
        self,
        requests: AsyncIterator[pipeline_pb2.StreamRequest],
        info: wire.HeaderInfo,
        ops: list[RemovalOp],
        names: list[str],
        admission: Admission,
        started: float,
    ):
        yield bgremoval_pb2.CandidateResponse(accepted=bgremoval_pb2.CandidatesAccepted(models=names))
        whole = await receive_whole(requests, info)
        candidates_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()

        async def prepared(index: int) -> int:
            await loop.run_in_executor(self.candidate_executor, ops[index].prepare, whole)
            return index

        for finished in asyncio.as_completed([prepared(i) for i in range(len(ops))]):
            index = await finished
            op = ops[index]
            # recorded before the client hears of it: its pick (RecordChoice) may follow at once
            await asyncio.to_thread(self.store.record_run, candidates_id, op.segmenter.name, op.compute_ms, True)
            metrics.INFERENCE_SECONDS.labels("bgremoval", op.segmenter.name, op.segmenter.backend).observe(
                op.compute_ms / 1000
            )
            header = output_header(op, info)
            yield bgremoval_pb2.CandidateResponse(
                start=bgremoval_pb2.CandidateStart(candidate=index, image=header, report=op.report)
            )
            assembler = GridAssembler(
                op.out_width,
                op.out_height,
                wire.MODE_CHANNELS[op.out_mode],
                op.out_dtype,
                header.tile_width,
                header.tile_height,
            )
            for job in op.jobs:
                out = await admission.compute(op.render, job, whole)
                for cell, pixels in assembler.add(job, out):
                    yield bgremoval_pb2.CandidateResponse(
                        tile=bgremoval_pb2.CandidateTile(candidate=index, tile=wire.tile(cell, pixels))
                    )
            op.report.tiles = len(op.jobs)
            op.report.compute_ms = op.compute_ms
            yield bgremoval_pb2.CandidateResponse(done=bgremoval_pb2.CandidateDone(candidate=index, report=op.report))
        yield bgremoval_pb2.CandidateResponse(
            summary=bgremoval_pb2.CandidatesSummary(
                request_id=candidates_id, total_ms=(time.perf_counter() - started) * 1000
            )
        )

    @rpc()
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(**model.info()) for model in self.registry.models.values()],
            default_model=self.registry.default_model(),
        )

    @rpc()
    async def RecordChoice(
        self, request: bgremoval_pb2.RecordChoiceRequest, context: grpc.aio.ServicerContext
    ) -> bgremoval_pb2.RecordChoiceResponse:
        if not request.request_id or not request.model:
            raise InvalidArgument("request_id and model are required", field="request_id")
        offered = await asyncio.to_thread(self.store.candidates, request.request_id)
        if not offered:
            raise ModelNotFound(
                f"no candidates were made under request_id {quoted(request.request_id)}",
                reason="request_not_found",
                field="request_id",
            )
        if request.model not in offered:
            raise InvalidArgument(
                f"{quoted(request.model)} was not a candidate of that request; candidates: {', '.join(offered)}",
                field="model",
            )
        await asyncio.to_thread(self.store.record_choice, request.request_id, request.model)
        return bgremoval_pb2.RecordChoiceResponse(request_id=request.request_id, model=request.model)

    @rpc()
    async def GetStats(
        self, request: bgremoval_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> bgremoval_pb2.GetStatsResponse:
        stats = await asyncio.to_thread(self.store.stats)
        return bgremoval_pb2.GetStatsResponse(
            models=[bgremoval_pb2.ModelStats(**m) for m in stats["models"]],
            choices=stats["choices"],
            requests=stats["requests"],
            cache_hits=self.cache.hits,
            cache_misses=self.cache.misses,
            cache_bytes=self.cache.bytes,
            cache_entries=len(self.cache),
        )
