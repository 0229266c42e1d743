"""What every gateway route shares: configuration, the mesh client, auth and
rate limit, URL fetching, the result store, jobs, and the path an image
request takes (read, decode, process along the mesh, encode, answer)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from imagemesh.v1 import common_pb2, pipeline_pb2
from starlette.concurrency import run_in_threadpool

from services.common import imageio, logs, wire
from services.common.fields import Fields
from services.common.mesh import MeshClient, Processed
from services.common.steps import remove_background_options
from services.common.tiles import BandAssembler

from .auth import TokenAuth
from .budget import PixelBudget
from .config import GatewayConfig
from .errors import AnswerAborted, HttpError
from .estimate import estimate_seconds
from .fields import FORMAT, QUALITY
from .inputs import ImageRequest, read_image_request
from .jobs import JobManager
from .state import open_state
from .store import Stored
from .urlfetch import UrlFetcher, parse_networks

logger = logging.getLogger("imagemesh.gateway")

SWEEP_SECONDS = 30
MODEL_SPEEDS_SECONDS = 60  # models load and calibrate at start: their speeds rarely change


DISCONNECT_POLL_SECONDS = 0.25


async def until_disconnected(request: Request, work):
    """Await `work`, cancelling it (and with it the gRPC calls down the pipeline)
    if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                logs.log(logger, logging.INFO, "client went away: cancelling its work")
                raise HttpError(499, "client_closed_request", "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def error_response(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": reason, "message": message, "request_id": logs.request_id_var.get()}},
        status_code=status,
        headers=headers,
    )


def assembled_bytes(width: int, height: int, channels: int, itemsize: int) -> int:
    """What an output assembled whole takes in the gateway: its pixels and an 8-bit copy for the encoder."""
    return width * height * channels * (itemsize + 1)


def output_bytes(header: common_pb2.ImageHeader) -> int:
    info = wire.HeaderInfo(header, header.width * header.height)
    return assembled_bytes(info.width, info.height, info.channels, info.dtype.itemsize)


@dataclass
class StoredRun:
    stored: Stored
    width: int
    height: int
    steps: list[dict]
    timings_ms: dict


def step_headers(reports: list[pipeline_pb2.StepReport], width: int, height: int) -> dict[str, str]:
    """The X-Imagemesh-* headers of an image answer: each step's model and backend, and the size."""
    return {
        "X-Imagemesh-Model": ",".join(r.name for r in reports),
        "X-Imagemesh-Backend": ",".join(r.backend for r in reports),
        "X-Imagemesh-Size": f"{width}x{height}",
        "X-Imagemesh-Steps": ", ".join(f"{r.op}={r.name}/{r.backend}" for r in reports),
    }


class Gateway:
    """Built whole inside the serving event loop (the mesh's grpc.aio channels belong to it);
    `running()` holds its background work (job workers, the result sweeper)."""

    def __init__(self, config: GatewayConfig, mesh: MeshClient):
        self.config = config
        self.mesh = mesh
        self.started = time.time()
        self.auth = TokenAuth(config.api_tokens, parse_networks(config.trusted_proxies))
        self.fetcher = UrlFetcher(
            max_bytes=config.max_upload_bytes,
            timeout_seconds=config.url_fetch_timeout_seconds,
            allowlist=config.url_fetch_allowlist,
            enabled=config.url_fetch_enabled,
        )
        self.state = open_state(config)
        self.budget = PixelBudget(config.gateway_max_pixel_bytes)
        self.jobs = JobManager(
            self.run_job, self.state, workers=config.max_concurrent_jobs, queue_size=config.job_queue_size
        )
        self.effects: list[dict] | None = None  # the effects catalogue, once read
        self._models: dict[str, common_pb2.ListModelsResponse] = {}  # the services' models, for estimates
        self._models_read = -math.inf

    async def estimate_seconds(self, image: imageio.DecodedImage, reports) -> float:
        """How long a run of these steps should take (estimate.py), from the models' measured
        speeds read at most every MODEL_SPEEDS_SECONDS; 0 when they cannot be read now."""
        if time.monotonic() - self._models_read > MODEL_SPEEDS_SECONDS:
            try:
                self._models = await self.mesh.list_models()
                self._models_read = time.monotonic()
            except HttpError:
                pass  # an estimate is a courtesy: the job goes ahead without one
        return estimate_seconds(image.width, image.height, list(reports), self._models)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        self.jobs.start()
        sweeper = asyncio.create_task(self._sweep())
        try:
            yield self
        finally:
            sweeper.cancel()
            await self.jobs.stop()
            await self.mesh.close()
            await self.state.close()

    async def _sweep(self) -> None:
        while True:
            try:
                await self.state.sweep()
            except HttpError as exc:
                logs.log(logger, logging.WARNING, "sweep failed", error=exc.message)
            await asyncio.sleep(SWEEP_SECONDS)

    async def load_effects(self) -> None:
        """Read the effects catalogue once (it changes only with the effects service's code)."""
        if self.effects is None:
            try:
                reply = await self.mesh.list_effects()
            except HttpError:
                return  # not reachable yet: the schema stays generic until it is
            self.effects = MessageToDict(reply, preserving_proto_field_name=True)["effects"]

    async def guard(self, request: Request) -> str:
        """Auth, then the rate limit; a FastAPI dependency of every processing route."""
        identity = self.auth.identify(request)
        await self.state.check_rate(identity)
        return identity

    async def read(self, request: Request, base64_fields: tuple[str, ...] = ("image_base64",)) -> ImageRequest:
        return await read_image_request(request, self.config.max_upload_bytes, self.fetcher.fetch, base64_fields)

    async def decode(self, data: bytes, held: bool = False) -> tuple[imageio.DecodedImage, float]:
        """Decode an upload; its pixels count in the budget until the request's answer
        ends (unless the caller `held` room already, as a job does)."""
        if not held:
            self.budget.take_for_request(imageio.decoded_bytes(data, self.config.max_input_pixels))
        started = time.perf_counter()
        image = await run_in_threadpool(
            imageio.decode, data, max_bytes=self.config.max_upload_bytes, max_pixels=self.config.max_input_pixels
        )
        return image, round((time.perf_counter() - started) * 1000, 1)

    @staticmethod
    def output_options(fields: Fields, format_field: str = "format", default_format: str = "auto") -> tuple[str, int]:
        """The output format (from `format_field`: earlier services call it output_format) and quality."""
        return (replace(FORMAT, name=format_field, default=default_format).read(fields), QUALITY.read(fields))

    async def encode(
        self, result: Processed, requested_format: str, source_format: str, quality: int
    ) -> tuple[str, bytes, float]:
        fmt = imageio.choose_format(requested_format, source_format, result.mode in ("LA", "RGBA"))
        started = time.perf_counter()
        body = await run_in_threadpool(
            imageio.encode,
            result.pixels,
            result.mode,
            fmt,
            icc_profile=result.icc_profile,
            quality=quality,
            png_level=self.config.png_compression_level,
        )
        return fmt, body, round((time.perf_counter() - started) * 1000, 1)

    def hold_output(self, header: common_pb2.ImageHeader) -> None:
        """Room for an output assembled whole (and its 8-bit copy for the encoder)."""
        self.budget.take_for_request(output_bytes(header))

    async def run_job(
        self,
        data: bytes,
        steps: list[pipeline_pb2.Step],
        fmt: str,
        quality: int,
        needs: int,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> StoredRun:
        """A job's run: waits for room for its pixels (known at submission), decodes, runs."""
        hold = await self.budget.wait_for(needs)
        try:
            image, _ = await self.decode(data, held=True)
            return await self.run_to_store(image, steps, fmt, quality, progress, held=True)
        finally:
            hold.release()

    async def run_to_store(
        self,
        image: imageio.DecodedImage,
        steps: list[pipeline_pb2.Step],
        fmt: str,
        quality: int,
        progress: Callable[[int, int], Awaitable[None]] | None = None,
        held: bool = False,
    ) -> StoredRun:
        """Process and keep the encoded result in the store (jobs, download links)."""
        started = time.perf_counter()
        result = await self.mesh.process(image, steps, progress, None if held else self.hold_output)
        out_format, body, encode_ms = await self.encode(result, fmt, image.format, quality)
        stored = await self.state.put_result(body, out_format)
        height, width = result.pixels.shape[:2]
        timings = {**result.timings_ms, "encode": encode_ms, "total": round((time.perf_counter() - started) * 1000, 1)}
        return StoredRun(stored, width, height, [wire.as_json(r) for r in result.reports], timings)

    async def answer(
        self,
        request: Request,
        req: ImageRequest,
        steps: list[pipeline_pb2.Step],
        started: float,
        extra_json: Callable[[Processed], dict] = lambda result: {},
        *,
        format_field: str = "format",
        default_format: str = "auto",
    ):
        """Decode, process, encode; the image, or JSON when the client asks for it."""
        requested_format, quality = self.output_options(req.fields, format_field, default_format)
        image, decode_ms = await self.decode(req.data)
        wants_json = "application/json" in request.headers.get("accept", "")
        mesh_started = time.perf_counter()
        events = self.mesh.stream(image, steps)
        header = await until_disconnected(request, anext(events))  # a refusal is a 4xx here, before any byte
        has_alpha = header.image.color_mode in (common_pb2.COLOR_MODE_GRAY_ALPHA, common_pb2.COLOR_MODE_RGBA)
        if not wants_json and imageio.choose_format(requested_format, image.format, has_alpha) == "png":
            return self.streamed_png(header, events, decode_ms)
        self.hold_output(header.image)
        result = await until_disconnected(request, self.mesh.collect(header, events, mesh_started))
        fmt, body, encode_ms = await self.encode(result, requested_format, image.format, quality)
        height, width = result.pixels.shape[:2]
        timings = {
            "decode": decode_ms,
            **result.timings_ms,
            "encode": encode_ms,
            "total": round((time.perf_counter() - started) * 1000, 1),
        }
        headers = step_headers(result.reports, width, height)
        if wants_json:
            return {
                "image_base64": base64.b64encode(body).decode("ascii"),
                "width": width,
                "height": height,
                "format": fmt,
                "model": headers["X-Imagemesh-Model"],
                "backend": headers["X-Imagemesh-Backend"],
                **extra_json(result),
                "steps": [wire.as_json(r) for r in result.reports],
                "timings_ms": timings,
            }
        return Response(
            body,
            media_type=imageio.MEDIA_TYPES[fmt],
            headers={**headers, "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings.items())},
        )

    def streamed_png(self, result: pipeline_pb2.StreamResult, events, decode_ms: float) -> StreamingResponse:
        """PNG written band by band as the tiles arrive: encoding overlaps the
        services' work and no whole image is ever held here."""
        info = wire.HeaderInfo(result.image, result.image.width * result.image.height)
        writer = imageio.PngWriter(
            info.width,
            info.height,
            info.mode,
            8 * info.dtype.itemsize,
            result.image.icc_profile,
            level=self.config.png_compression_level,
        )
        bands = BandAssembler(info.width, info.height, info.channels, info.dtype, result.image.tile_height)

        async def body():
            yield writer.start()
            try:
                async for item in events:
                    if isinstance(item, tuple):
                        for band in bands.add(*item):
                            yield await run_in_threadpool(writer.rows, band)
            except HttpError as exc:
                raise AnswerAborted(f"the PNG was cut short: {exc.message}") from None
            yield writer.finish()

        return StreamingResponse(
            body(),
            media_type=imageio.MEDIA_TYPES["png"],
            headers={
                **step_headers(list(result.steps), info.width, info.height),
                "Server-Timing": f"decode;dur={decode_ms}",
            },
        )

    async def candidates(
        self, req: ImageRequest, models: list[str], started: float, format_field: str = "format"
    ) -> dict:
        """Several background-removal models on one upload: JSON with every candidate."""
        options = remove_background_options(req.fields, models)
        requested_format, quality = self.output_options(req.fields, format_field)
        image, decode_ms = await self.decode(req.data)
        cut_out = assembled_bytes(image.width, image.height, 4, image.pixels.dtype.itemsize)  # alpha kept or added
        self.budget.take_for_request(len(models) * cut_out)
        request_id, results = await self.mesh.candidates(image, options)
        out = []
        for result in results:
            fmt, body, _ = await self.encode(result, requested_format, image.format, quality)
            height, width = result.pixels.shape[:2]
            (report,) = result.reports
            out.append(
                {
                    "model": report.name,
                    "backend": report.backend,
                    "compute_ms": round(report.compute_ms, 1),
                    "cache_hit": report.cache_hit,
                    "width": width,
                    "height": height,
                    "format": fmt,
                    "image_base64": base64.b64encode(body).decode("ascii"),
                }
            )
        return {
            "request_id": request_id,
            "candidates": out,
            "timings_ms": {"decode": decode_ms, "total": round((time.perf_counter() - started) * 1000, 1)},
        }

    async def stored_response(self, file_id: str, missing: HttpError) -> Response:
        """A stored result's bytes, or `missing` once it has expired."""
        found = await self.state.get_result(file_id)
        if found is None:
            raise missing
        stored, data = found
        return Response(
            data,
            media_type=stored.media_type,
            headers={
                "Cache-Control": "private, max-age=60",
                "Content-Disposition": f'inline; filename="{stored.file_id}.{stored.format}"',
            },
        )
