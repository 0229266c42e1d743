"""The mesh's gRPC client: streams an image out as tiles to the first step's
service (which forwards the rest of the pipeline along the mesh) and
assembles the tiles that come back; retries on another replica, spreads a
large upscale over the upscaler's replicas in bands. The gateway and the
client library (imagemesh_client.GrpcClient) both use it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagemesh.v1 import (
    bgremoval_pb2,
    bgremoval_pb2_grpc,
    common_pb2,
    effects_pb2,
    effects_pb2_grpc,
    pipeline_pb2,
    upscaler_pb2_grpc,
)

from . import logs, wire
from .failures import HttpError, from_rpc_error
from .imageio import DecodedImage
from .server import CHANNEL_OPTIONS, channel_target, replica_count
from .streaming import Sender
from .tiles import GridAssembler, Rect, grid
from .topology import BY_STEP, SERVICES

logger = logging.getLogger("imagemesh.mesh")


@dataclass
class Processed:
    pixels: np.ndarray
    mode: str
    icc_profile: bytes
    reports: list[pipeline_pb2.StepReport]
    timings_ms: dict = field(default_factory=dict)


RETRIES = 3  # attempts after the first, on another replica
BAND_CONTEXT = 32  # rows above and below a band that its replica sees, so that bands meet without seams
# Refusals are final; a replica that went away, or a stream cut short, is worth another try.
RETRYABLE = {"upstream_unavailable", "upstream_incomplete", "upstream_connection_lost", "unavailable"}


def retryable(exc: HttpError) -> bool:
    return exc.reason in RETRYABLE


async def backoff(attempt: int, what: str, exc: HttpError) -> None:
    delay = 0.2 * 2**attempt
    logs.log(
        logger,
        logging.WARNING,
        "retrying on another replica",
        what=what,
        attempt=attempt + 1,
        reason=exc.reason,
        error=exc.message,
        delay_s=delay,
    )
    await asyncio.sleep(delay)


def banded_scale(steps: list[pipeline_pb2.Step]) -> int:
    """The integer scale of a lone upscale step (what can be cut into bands), else 0."""
    if len(steps) != 1 or steps[0].WhichOneof("op") != "upscale":
        return 0
    scale = steps[0].upscale.scale
    return int(scale) if scale >= 1 and float(scale).is_integer() else 0


def _metadata() -> tuple:
    return ((logs.REQUEST_ID_HEADER, logs.request_id_var.get() or logs.new_request_id()),)


class ImageAssembler:
    """One output image from its header and tiles: a GridAssembler whose one cell is the whole image."""

    def __init__(self, header: common_pb2.ImageHeader):
        self.info = wire.HeaderInfo(header, header.width * header.height)
        self._cells = GridAssembler(
            self.info.width, self.info.height, self.info.channels, self.info.dtype, self.info.width, self.info.height
        )
        self._pixels: np.ndarray | None = None

    def add_tile(self, tile: common_pb2.Tile) -> None:
        self.add(*wire.tile_pixels(tile, self.info))

    def add(self, rect: Rect, pixels: np.ndarray) -> None:
        for _, whole in self._cells.add(rect, pixels):
            self._pixels = whole

    @property
    def complete(self) -> bool:
        return self._pixels is not None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            raise HttpError(502, "upstream_incomplete", "the stream ended with tiles of its image missing")
        return self._pixels


def image_messages(image: DecodedImage, steps: list[pipeline_pb2.Step]):
    """The start message of a stream carrying `image`, and its tiles (made as they are sent)."""
    pixels = image.pixels
    header = wire.grid_header(
        image.width, image.height, image.mode, pixels.dtype, icc_profile=image.icc_profile, source_format=image.format
    )
    whole = Rect(0, 0, image.width, image.height)
    tiles = (
        pipeline_pb2.StreamRequest(tile=wire.tile(rect, pixels[rect.relative_to(whole)]))
        for rect in grid(image.width, image.height, header.tile_width, header.tile_height)
    )
    return pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(image=header, steps=steps)), tiles


class MeshClient:
    def __init__(
        self, addresses: Mapping[str, str], timeout: float, *, upscale_fanout: int = 0, upscale_band_rows: int = 512
    ):
        """`addresses`: each service's by its name; `upscale_fanout`: how many bands of
        one upscale run at once, on as many replicas (0: one per listed replica)."""
        self.timeout = timeout
        self.channels = {
            service.name: grpc.aio.insecure_channel(channel_target(addresses[service.name]), options=CHANNEL_OPTIONS)
            for service in SERVICES
        }
        self.fanout = upscale_fanout or replica_count(addresses["upscaler"])
        self.band_rows = upscale_band_rows
        self.upscaler = upscaler_pb2_grpc.UpscalerStub(self.channels["upscaler"])
        self.bgremoval = bgremoval_pb2_grpc.BackgroundRemovalStub(self.channels["bgremoval"])
        self.effects = effects_pb2_grpc.EffectsStub(self.channels["effects"])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    async def health(self) -> dict[str, str]:
        statuses = {}
        for service in SERVICES:
            try:
                reply = await health_pb2_grpc.HealthStub(self.channels[service.name]).Check(
                    health_pb2.HealthCheckRequest(service=service.grpc_service), timeout=2
                )
                statuses[service.name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                statuses[service.name] = exc.code().name
        return statuses

    async def _unary(self, service: str, call, request):
        try:  # wait_for_ready: a service that is restarting gets its deadline to come back
            return await call(request, timeout=30, metadata=_metadata(), wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, service) from None

    async def list_models(self) -> dict[str, common_pb2.ListModelsResponse]:
        return {
            "upscaler": await self._unary("upscaler", self.upscaler.ListModels, common_pb2.ListModelsRequest()),
            "bgremoval": await self._unary("bgremoval", self.bgremoval.ListModels, common_pb2.ListModelsRequest()),
        }

    async def list_effects(self) -> effects_pb2.ListEffectsResponse:
        return await self._unary("effects", self.effects.ListEffects, effects_pb2.ListEffectsRequest())

    async def record_choice(self, request_id: str, model: str) -> bgremoval_pb2.RecordChoiceResponse:
        return await self._unary(
            "bgremoval",
            self.bgremoval.RecordChoice,
            bgremoval_pb2.RecordChoiceRequest(request_id=request_id, model=model),
        )

    async def stats(self) -> bgremoval_pb2.GetStatsResponse:
        return await self._unary("bgremoval", self.bgremoval.GetStats, bgremoval_pb2.GetStatsRequest())

    def stream(self, image: DecodedImage, steps: list[pipeline_pb2.Step]):
        """Run the steps, the first step's service forwarding the rest along the mesh.
        Yields the StreamResult first, then output regions as (rect, pixels),
        then the StreamSummary; a failure raises HttpError. A large upscale is
        spread over the upscaler's replicas in bands."""
        scale = self._band_scale(image, steps)
        return self._stream_bands(image, steps, scale) if scale else self._stream_once(image, steps)

    def _band_scale(self, image: DecodedImage, steps: list[pipeline_pb2.Step]) -> int:
        """The scale to cut this image into bands at, or 0 to send it whole."""
        if self.fanout > 1 and image.height > self.band_rows:
            return banded_scale(steps)
        return 0

    async def _stream_once(self, image: DecodedImage, steps: list[pipeline_pb2.Step]):
        """One call, retried on another replica while nothing has come back yet."""
        for attempt in range(RETRIES + 1):
            started = False
            try:
                async for item in self._call(image, steps):
                    started = True
                    yield item
                return
            except HttpError as exc:
                if started or not retryable(exc) or attempt == RETRIES:
                    raise
                await backoff(attempt, "call", exc)

    def _open(self, steps: list[pipeline_pb2.Step]) -> tuple[str, grpc.aio.StreamStreamCall]:
        """A stream to the first step's service (its requests to be written by a Sender)."""
        service = BY_STEP[steps[0].WhichOneof("op")]
        method = self.channels[service.name].stream_stream(
            service.method,
            request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString,
        )
        return service.name, method(timeout=self.timeout, metadata=_metadata())

    async def validate(self, image: DecodedImage, steps: list[pipeline_pb2.Step]) -> pipeline_pb2.StreamResult:
        """Check a request along its whole chain, each service as it checks a real one
        (parameters, models, output sizes), without running it: the StreamResult, or HttpError."""
        start, _ = image_messages(image, steps)
        start.start.validate_only = True
        service, call = self._open(steps)
        sender = Sender(call, start, ())
        try:
            async for reply in call:
                if reply.WhichOneof("part") == "result":
                    return reply.result
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, service) from None
        finally:
            call.cancel()
            await sender.close()
        raise HttpError(502, "upstream_incomplete", f"the {service} ended its check without an answer")

    async def _call(self, image: DecodedImage, steps: list[pipeline_pb2.Step]):
        service, call = self._open(steps)
        sender = Sender(call, *image_messages(image, steps))
        info, received, finished = None, 0, False
        try:
            async for reply in call:
                part = reply.WhichOneof("part")
                if part == "result":
                    sender.accepted.set()
                    info = wire.HeaderInfo(reply.result.image, reply.result.image.width * reply.result.image.height)
                    yield reply.result
                elif part == "tile":
                    if info is None:
                        raise HttpError(502, "upstream_protocol", f"the {service} sent a tile before its result")
                    rect, pixels = wire.tile_pixels(reply.tile, info)
                    received += rect.width * rect.height
                    yield rect, pixels
                else:
                    if info is None or received != info.width * info.height:
                        break
                    finished = True
                    yield reply.summary
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, service) from None
        finally:
            call.cancel()  # a caller that stops listening stops the work
            await sender.close()
        if not finished:
            raise HttpError(502, "upstream_incomplete", f"the {service} ended its stream before the image was complete")

    async def process(
        self,
        image: DecodedImage,
        steps: list[pipeline_pb2.Step],
        progress: Callable[[int, int], Awaitable[None]] | None = None,
        reserve: Callable[[common_pb2.ImageHeader], None] | None = None,
    ) -> Processed:
        """The whole output image. A single call is retried whole when its replica
        fails, even midway (nothing has gone to the client yet); bands retry themselves.
        `progress(tiles_done, tiles_total)` follows the tiles as they arrive; `reserve(header)`
        is called once the output's size is known, before it is assembled."""
        scale = self._band_scale(image, steps)
        attempt = 0
        while True:  # ends by returning, or raising once RETRIES are spent
            started = time.perf_counter()
            events = self._stream_bands(image, steps, scale) if scale else self._call(image, steps)
            try:
                result = await anext(events)
                if reserve and attempt == 0:
                    try:
                        reserve(result.image)
                    except HttpError:
                        await events.aclose()  # no room: the call ends here
                        raise
                return await self.collect(result, events, started, progress)
            except HttpError as exc:
                if scale or not retryable(exc) or attempt == RETRIES:
                    raise
                await backoff(attempt, "image", exc)
                attempt += 1

    async def _stream_bands(self, image: DecodedImage, steps: list[pipeline_pb2.Step], scale: int):
        """Bands of rows (with context rows above and below) upscaled concurrently,
        each call on the next replica, each retried on another when its replica fails.
        The bands' rows are re-cut into the cells of the output grid that every
        service declares (output_grid_header), whatever the band height."""
        height, width = image.height, image.width
        bands = [(top, min(top + self.band_rows, height)) for top in range(0, height, self.band_rows)]
        done: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.fanout)

        async def band(index: int, top: int, bottom: int) -> None:
            above, below = max(0, top - BAND_CONTEXT), min(height, bottom + BAND_CONTEXT)
            part = DecodedImage(image.pixels[above:below], image.mode, image.icc_profile, image.format)
            for attempt in range(RETRIES + 1):
                try:
                    async with slots:
                        events = self._call(part, steps)
                        result = await self.collect(await anext(events), events, time.perf_counter())
                    break
                except HttpError as exc:
                    if not retryable(exc) or attempt == RETRIES:
                        raise
                    await backoff(attempt, f"band {index} (rows {top}-{bottom})", exc)
            rows = result.pixels[scale * (top - above) : scale * (bottom - above)]
            await done.put((Rect(0, scale * top, width * scale, scale * bottom), rows, result))

        async def guarded(index, top, bottom):
            try:
                await band(index, top, bottom)
            except BaseException as exc:
                await done.put(exc)
                raise

        tasks = [asyncio.create_task(guarded(i, top, bottom)) for i, (top, bottom) in enumerate(bands)]
        started = time.perf_counter()

        async def next_band():
            item = await done.get()
            if isinstance(item, BaseException):
                raise item
            return item

        try:
            rect, rows, first = await next_band()  # the first band done sets the output's header
            header = wire.grid_header(
                width * scale,
                height * scale,
                first.mode,
                first.pixels.dtype,
                icc_profile=image.icc_profile,
                source_format=image.format,
            )
            assembler = GridAssembler(
                header.width, header.height, rows.shape[2], rows.dtype, header.tile_width, header.tile_height
            )
            yield pipeline_pb2.StreamResult(image=header, steps=first.reports)
            for band_number in range(len(bands)):
                if band_number:
                    rect, rows, _ = await next_band()
                for cell in assembler.add(rect, rows):
                    yield cell
            summary = pipeline_pb2.StreamSummary(steps=first.reports, total_ms=(time.perf_counter() - started) * 1000)
            for report in summary.steps:
                report.details["bands"] = str(len(bands))
            yield summary
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def collect(
        result: pipeline_pb2.StreamResult,
        events,
        started: float,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> Processed:
        """Assemble the rest of an opened stream into the whole image."""
        assembler = ImageAssembler(result.image)
        tiles_total = math.ceil(result.image.width / result.image.tile_width) * math.ceil(
            result.image.height / result.image.tile_height
        )
        tiles_done, first_tile_ms, summary = 0, 0.0, None
        async for item in events:
            if isinstance(item, tuple):
                first_tile_ms = first_tile_ms or (time.perf_counter() - started) * 1000
                assembler.add(*item)
                tiles_done += 1
                if progress:
                    await progress(tiles_done, tiles_total)
            else:
                summary = item
        if summary is None:  # the streams raise before they end without one; said here for the reader
            raise HttpError(502, "upstream_incomplete", "the stream ended without its summary")
        return Processed(
            assembler.pixels,
            assembler.info.mode,
            result.image.icc_profile,
            list(summary.steps),
            {"mesh": round((time.perf_counter() - started) * 1000, 1), "first_tile": round(first_tile_ms, 1)},
        )

    async def candidates(self, image: DecodedImage, options: pipeline_pb2.RemoveBackgroundOptions):
        """Several background-removal models on one upload; returns (request_id, [Processed]), one a model."""
        steps = [pipeline_pb2.Step(remove_background=options)]
        assemblers: dict[int, ImageAssembler] = {}
        done: dict[int, pipeline_pb2.StepReport] = {}
        request_id = ""
        call = self.bgremoval.RemoveBackgroundCandidates(timeout=self.timeout, metadata=_metadata())
        sender = Sender(call, *image_messages(image, steps))
        try:
            async for reply in call:
                part = reply.WhichOneof("part")
                if part == "accepted":
                    sender.accepted.set()
                elif part == "start":
                    assemblers[reply.start.candidate] = ImageAssembler(reply.start.image)
                elif part == "tile":
                    assemblers[reply.tile.candidate].add_tile(reply.tile.tile)
                elif part == "done":
                    done[reply.done.candidate] = reply.done.report
                else:
                    request_id = reply.summary.request_id
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "bgremoval") from None
        finally:
            call.cancel()
            await sender.close()
        if not request_id or len(done) != len(options.models) or not all(a.complete for a in assemblers.values()):
            raise HttpError(502, "upstream_incomplete", "the bgremoval service ended its stream early")
        return request_id, [
            Processed(a.pixels, a.info.mode, a.info.msg.icc_profile, [done[i]]) for i, a in sorted(assemblers.items())
        ]
