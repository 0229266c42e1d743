"""The gateway's gRPC client for the mesh: streams an image out as tiles to
the first step's service and assembles the tiles that come back."""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagemesh.v1 import (bgremoval_pb2, bgremoval_pb2_grpc, common_pb2, effects_pb2, effects_pb2_grpc,
                          pipeline_pb2, upscaler_pb2_grpc)

from services.common import logs, wire
from services.common.imageio import DecodedImage
from services.common.server import CHANNEL_OPTIONS
from services.common.streaming import STEP_METHODS, STEP_ADDRESS_SETTINGS
from services.common.tiles import Rect, grid, wire_tile_size

from .errors import HttpError, from_rpc_error

SERVICES = {"upscaler": "imagemesh.v1.Upscaler", "bgremoval": "imagemesh.v1.BackgroundRemoval",
            "effects": "imagemesh.v1.Effects"}
STEP_SERVICE = {"upscale": "upscaler", "remove_background": "bgremoval", "effect": "effects"}


@dataclass
class Processed:
    pixels: np.ndarray
    mode: str
    icc_profile: bytes
    steps: list[dict]
    timings_ms: dict = field(default_factory=dict)


def report_dict(report: pipeline_pb2.StepReport) -> dict:
    return MessageToDict(report, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _metadata() -> tuple:
    return ((logs.REQUEST_ID_HEADER, logs.request_id_var.get() or logs.new_request_id()),)


class ImageAssembler:
    """Collects one output image from its header and tiles."""

    def __init__(self, header: common_pb2.ImageHeader):
        self.info = wire.HeaderInfo(header, header.width * header.height)
        self.pixels = np.empty((self.info.height, self.info.width, self.info.channels), self.info.dtype)
        self.received = 0

    def add(self, tile: common_pb2.Tile) -> None:
        rect, pixels = wire.tile_pixels(tile, self.info)
        self.pixels[rect.y0:rect.y1, rect.x0:rect.x1] = pixels
        self.received += rect.width * rect.height

    @property
    def complete(self) -> bool:
        return self.received == self.info.width * self.info.height


def _input_stream(image: DecodedImage, steps: list[pipeline_pb2.Step], accepted: asyncio.Event):
    """The start message, then (once the service has accepted it, see
    streaming.ACCEPT_BEFORE_TILES) the image's tiles."""
    pixels = image.pixels
    edge = wire_tile_size(image.width, pixels.shape[2] * pixels.dtype.itemsize)
    header = wire.header(image.width, image.height, image.mode, pixels.dtype, icc_profile=image.icc_profile,
                         source_format=image.format, tile_width=edge, tile_height=edge)
    whole = Rect(0, 0, image.width, image.height)

    async def requests():
        yield pipeline_pb2.StreamRequest(start=pipeline_pb2.StreamStart(image=header, steps=steps))
        await accepted.wait()
        for rect in grid(image.width, image.height, edge, edge):
            yield pipeline_pb2.StreamRequest(tile=wire.tile(rect, pixels[rect.relative_to(whole)]))
    return requests()


class MeshClient:
    def __init__(self, config):
        self.timeout = config.upstream_timeout_seconds
        self.channels = {name: grpc.aio.insecure_channel(getattr(config, f"{name}_address"), options=CHANNEL_OPTIONS)
                         for name in SERVICES}
        self.upscaler = upscaler_pb2_grpc.UpscalerStub(self.channels["upscaler"])
        self.bgremoval = bgremoval_pb2_grpc.BackgroundRemovalStub(self.channels["bgremoval"])
        self.effects = effects_pb2_grpc.EffectsStub(self.channels["effects"])
        assert set(STEP_ADDRESS_SETTINGS) == set(STEP_SERVICE)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    async def health(self) -> dict[str, str]:
        statuses = {}
        for name, service in SERVICES.items():
            try:
                reply = await health_pb2_grpc.HealthStub(self.channels[name]).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2)
                statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                statuses[name] = exc.code().name
        return statuses

    async def _unary(self, service: str, call, request):
        try:  # wait_for_ready: a service that is restarting gets its deadline to come back
            return await call(request, timeout=30, metadata=_metadata(), wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, service) from None

    async def list_models(self) -> dict[str, common_pb2.ListModelsResponse]:
        return {"upscaler": await self._unary("upscaler", self.upscaler.ListModels, common_pb2.ListModelsRequest()),
                "bgremoval": await self._unary("bgremoval", self.bgremoval.ListModels, common_pb2.ListModelsRequest())}

    async def list_effects(self) -> effects_pb2.ListEffectsResponse:
        return await self._unary("effects", self.effects.ListEffects, effects_pb2.ListEffectsRequest())

    async def record_choice(self, request_id: str, model: str) -> bgremoval_pb2.RecordChoiceResponse:
        return await self._unary("bgremoval", self.bgremoval.RecordChoice,
                                 bgremoval_pb2.RecordChoiceRequest(request_id=request_id, model=model))

    async def stats(self) -> bgremoval_pb2.GetStatsResponse:
        return await self._unary("bgremoval", self.bgremoval.GetStats, bgremoval_pb2.GetStatsRequest())

    async def stream(self, image: DecodedImage, steps: list[pipeline_pb2.Step]):
        """Run the steps, the first step's service forwarding the rest along the mesh.
        Yields the StreamResult first, then each output tile as (rect, pixels),
        then the StreamSummary; a failure raises HttpError."""
        kind = steps[0].WhichOneof("op")
        service = STEP_SERVICE[kind]
        method = self.channels[service].stream_stream(
            STEP_METHODS[kind], request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
            response_deserializer=pipeline_pb2.StreamResponse.FromString)
        accepted = asyncio.Event()
        call = method(_input_stream(image, steps, accepted), timeout=self.timeout, metadata=_metadata())
        info, received, finished = None, 0, False
        try:
            async for reply in call:
                part = reply.WhichOneof("part")
                if part == "result":
                    accepted.set()
                    info = wire.HeaderInfo(reply.result.image, reply.result.image.width * reply.result.image.height)
                    yield reply.result
                elif part == "tile":
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
        if not finished:
            raise HttpError(502, "upstream_incomplete", f"the {service} ended its stream before the image was complete")

    async def process(self, image: DecodedImage, steps: list[pipeline_pb2.Step],
                      progress: Callable[[int, int], Awaitable[None]] | None = None) -> Processed:
        """The whole output image. `progress(tiles_done, tiles_total)` follows the tiles as they arrive."""
        started = time.perf_counter()
        events = self.stream(image, steps)
        return await self.collect(await anext(events), events, started, progress)

    @staticmethod
    async def collect(result: pipeline_pb2.StreamResult, events, started: float,
                      progress: Callable[[int, int], Awaitable[None]] | None = None) -> Processed:
        """Assemble the rest of an opened stream into the whole image."""
        assembler = ImageAssembler(result.image)
        tiles_total = math.ceil(result.image.width / result.image.tile_width) * \
            math.ceil(result.image.height / result.image.tile_height)
        tiles_done, first_tile_ms, summary = 0, 0.0, None
        async for item in events:
            if isinstance(item, tuple):
                first_tile_ms = first_tile_ms or (time.perf_counter() - started) * 1000
                rect, pixels = item
                assembler.pixels[rect.y0:rect.y1, rect.x0:rect.x1] = pixels
                tiles_done += 1
                if progress:
                    await progress(tiles_done, tiles_total)
            else:
                summary = item
        return Processed(assembler.pixels, assembler.info.mode, result.image.icc_profile,
                         [report_dict(r) for r in summary.steps],
                         {"mesh": round((time.perf_counter() - started) * 1000, 1),
                          "first_tile": round(first_tile_ms, 1)})

    async def candidates(self, image: DecodedImage, options: pipeline_pb2.RemoveBackgroundOptions):
        """Several background-removal models on one upload; returns (request_id, [(report, Processed)])."""
        steps = [pipeline_pb2.Step(remove_background=options)]
        assemblers: dict[int, ImageAssembler] = {}
        done: dict[int, dict] = {}
        request_id = ""
        accepted = asyncio.Event()
        try:
            async for reply in self.bgremoval.RemoveBackgroundCandidates(
                    _input_stream(image, steps, accepted), timeout=self.timeout, metadata=_metadata()):
                part = reply.WhichOneof("part")
                if part == "accepted":
                    accepted.set()
                elif part == "start":
                    assemblers[reply.start.candidate] = ImageAssembler(reply.start.image)
                elif part == "tile":
                    assemblers[reply.tile.candidate].add(reply.tile.tile)
                elif part == "done":
                    done[reply.done.candidate] = report_dict(reply.done.report)
                else:
                    request_id = reply.summary.request_id
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "bgremoval") from None
        if not request_id or len(done) != len(options.models) or not all(a.complete for a in assemblers.values()):
            raise HttpError(502, "upstream_incomplete", "the bgremoval service ended its stream early")
        return request_id, [(done[i], Processed(a.pixels, a.info.mode, a.info.msg.icc_profile, [done[i]]))
                            for i, a in sorted(assemblers.items())]
