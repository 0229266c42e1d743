"""The gateway's gRPC client for the upscaler: streams an image out as tiles
and assembles the tiles that come back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagemesh.v1 import upscaler_pb2, upscaler_pb2_grpc

from services.common import logs, wire
from services.common.imageio import DecodedImage
from services.common.tiles import Rect, grid, wire_tile_size

from .errors import HttpError, from_rpc_error


@dataclass
class Upscaled:
    pixels: np.ndarray
    mode: str
    icc_profile: bytes
    model: str
    backend: str
    scale: float
    timings_ms: dict = field(default_factory=dict)


def _metadata() -> tuple:
    return ((logs.REQUEST_ID_HEADER, logs.request_id_var.get() or logs.new_request_id()),)


class UpscalerClient:
    name = "upscaler"

    def __init__(self, address: str, timeout_seconds: float):
        self.address = address
        self.timeout = timeout_seconds
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = upscaler_pb2_grpc.UpscalerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def health_status(self) -> str:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service="imagemesh.v1.Upscaler"),
                                            timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async def list_models(self) -> upscaler_pb2.ListModelsResponse:
        try:
            return await self.stub.ListModels(upscaler_pb2.ListModelsRequest(), timeout=10, metadata=_metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.name) from None

    async def upscale(self, image: DecodedImage, options: upscaler_pb2.UpscaleOptions) -> Upscaled:
        started = time.perf_counter()
        pixels = image.pixels
        edge = wire_tile_size(image.width, pixels.shape[2] * pixels.dtype.itemsize)
        header = wire.header(image.width, image.height, image.mode, pixels.dtype, icc_profile=image.icc_profile,
                             source_format=image.format, tile_width=edge, tile_height=edge)
        whole = Rect(0, 0, image.width, image.height)

        async def requests():
            yield upscaler_pb2.UpscaleRequest(start=upscaler_pb2.UpscaleStart(image=header, options=options))
            for rect in grid(image.width, image.height, edge, edge):
                yield upscaler_pb2.UpscaleRequest(tile=wire.tile(rect, pixels[rect.relative_to(whole)]))

        result = summary = out = info = None
        first_tile_ms = 0.0
        pixels_received = 0
        try:
            async for reply in self.stub.Upscale(requests(), timeout=self.timeout, metadata=_metadata()):
                part = reply.WhichOneof("part")
                if part == "result":
                    result = reply.result
                    info = wire.HeaderInfo(result.image, result.image.width * result.image.height)
                    out = np.empty((info.height, info.width, info.channels), info.dtype)
                    out_rect = Rect(0, 0, info.width, info.height)
                elif part == "tile":
                    first_tile_ms = first_tile_ms or (time.perf_counter() - started) * 1000
                    rect, tile_pixels = wire.tile_pixels(reply.tile, info)
                    out[rect.relative_to(out_rect)] = tile_pixels
                    pixels_received += rect.width * rect.height
                else:
                    summary = reply.summary
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.name) from None
        if result is None or summary is None or pixels_received != info.width * info.height:
            raise HttpError(502, "upstream_incomplete", "the upscaler ended its stream before the image was complete")
        return Upscaled(out, info.mode, result.image.icc_profile, result.model, result.backend, result.scale,
                        {"upscale": round((time.perf_counter() - started) * 1000, 1),
                         "first_tile": round(first_tile_ms, 1), "inference": round(summary.inference_ms, 1)})
