"""REST/JSON in front of the gRPC services."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagemesh.v1 import upscaler_pb2

from services.common import imageio, logs, metrics
from services.common.config import Config
from services.common.errors import ServiceError

from .errors import HttpError, from_service_error
from .inputs import read_image_request
from .upstream import UpscalerClient

logger = logging.getLogger("imagemesh.gateway")

FORMAT_CHOICES = ("auto", "png", "jpeg", "webp")
FORMAT_ALIASES = {"jpg": "jpeg"}
ALPHA_MODES = {"lanczos": upscaler_pb2.ALPHA_MODE_LANCZOS, "model": upscaler_pb2.ALPHA_MODE_MODEL}

_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "the image"},
                "scale": {"type": "number", "default": 4, "minimum": 1, "maximum": 8},
                "model": {"type": "string", "default": "auto", "description": "a name from GET /v1/models"},
                "format": {"type": "string", "enum": list(FORMAT_CHOICES), "default": "auto"},
                "quality": {"type": "integer", "default": 92, "minimum": 1, "maximum": 100},
                "tile": {"type": "integer", "default": 0, "description": "tile size, 0 for automatic"},
                "alpha": {"type": "string", "enum": list(ALPHA_MODES), "default": "lanczos"},
            }}},
        "application/json": {"schema": {
            "type": "object", "required": ["image_base64"],
            "properties": {
                "image_base64": {"type": "string", "description": "the image, base64 (a data: URL is accepted)"},
                "scale": {"type": "number", "default": 4, "minimum": 1, "maximum": 8},
                "model": {"type": "string", "default": "auto"},
                "format": {"type": "string", "enum": list(FORMAT_CHOICES), "default": "auto"},
                "quality": {"type": "integer", "default": 92},
                "tile": {"type": "integer", "default": 0},
                "alpha": {"type": "string", "enum": list(ALPHA_MODES), "default": "lanczos"},
            }}},
    },
}
_IMAGE_RESPONSES = {
    200: {"description": "the image (or JSON with `Accept: application/json`)",
          "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {"schema": {
              "type": "object", "properties": {k: {} for k in (
                  "image_base64", "width", "height", "format", "model", "backend", "scale", "timings_ms")}}}}},
    **{code: {"description": text} for code, text in (
        (400, "invalid parameter"), (404, "unknown model"), (413, "image or output too large"),
        (415, "unsupported media type"), (422, "not a decodable image"), (429, "busy, retry after"),
        (503, "model not ready or service unavailable"), (504, "upstream timeout"))},
}


def error_response(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": reason, "message": message, "request_id": logs.request_id_var.get()}},
                        status_code=status, headers=headers)


def create_app(config: Config) -> FastAPI:
    upstreams: dict[str, UpscalerClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # grpc.aio channels belong to the event loop that serves requests.
        upstreams["upscaler"] = UpscalerClient(config.upscaler_address, config.upstream_timeout_seconds)
        yield
        for client in upstreams.values():
            await client.close()

    app = FastAPI(title="imagemesh", version="1.0",
                  description="AI image processing: Real-ESRGAN upscaling over a gRPC mesh.", lifespan=lifespan)

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        request_id = request.headers.get("x-request-id", "")[:64] or logs.new_request_id()
        token = logs.request_id_var.set(request_id)
        started = time.perf_counter()
        metrics.HTTP_IN_FLIGHT.inc()
        status = 500
        try:
            try:
                response = await call_next(request)
            except Exception:
                logger.exception("unhandled error")
                response = error_response(500, "internal", "internal error; quote the request id when reporting it")
            status = response.status_code
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
            metrics.HTTP_SECONDS.labels(route, request.method).observe(time.perf_counter() - started)
            logs.log(logger, logging.INFO, "request", method=request.method, path=request.url.path, status=status,
                     ms=round((time.perf_counter() - started) * 1000, 1))
            logs.request_id_var.reset(token)

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, exc: HttpError):
        return error_response(exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError):
        err = from_service_error(exc)
        return error_response(err.status, err.reason, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "invalid_argument", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, exc: StarletteHTTPException):
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, reason, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/healthz", tags=["health"], summary="Liveness: the gateway process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every upstream service reports SERVING",
             responses={503: {"description": "an upstream is not serving"}})
    async def readyz():
        names = list(upstreams)
        statuses = dict(zip(names, await asyncio.gather(*(upstreams[n].health_status() for n in names))))
        ready = all(status == "SERVING" for status in statuses.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "upstreams": statuses},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of the gateway")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["v1"], summary="Every model each service knows, with readiness and backend")
    async def list_models():
        reply = await upstreams["upscaler"].list_models()
        models = [dict(MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                       service="upscaler") for m in reply.models]
        return {"models": models, "defaults": {"upscaler": reply.default_model}}

    @app.post("/v1/upscale", tags=["v1"], summary="Upscale an image with Real-ESRGAN (or Lanczos)",
              openapi_extra={"requestBody": _IMAGE_BODY}, responses=_IMAGE_RESPONSES)
    async def upscale(request: Request):
        started = time.perf_counter()
        req = await read_image_request(request, config.max_upload_bytes)
        options = upscaler_pb2.UpscaleOptions(
            model=req.text("model", "auto"),
            scale=req.number("scale", 4.0),
            tile_size=req.number("tile", 0, integer=True, minimum=0, maximum=4096),
            alpha_mode=ALPHA_MODES[req.text("alpha", "lanczos", tuple(ALPHA_MODES))])
        requested_format = req.text("format", "auto", FORMAT_CHOICES, FORMAT_ALIASES)
        quality = req.number("quality", 92, integer=True, minimum=1, maximum=100)
        decode_started = time.perf_counter()
        image = await run_in_threadpool(imageio.decode, req.data, max_bytes=config.max_upload_bytes,
                                        max_pixels=config.max_input_pixels)
        decode_ms = (time.perf_counter() - decode_started) * 1000
        result = await upstreams["upscaler"].upscale(image, options)
        fmt = imageio.choose_format(requested_format, image.format, result.mode in ("LA", "RGBA"))
        encode_started = time.perf_counter()
        body = await run_in_threadpool(imageio.encode, result.pixels, result.mode, fmt,
                                       icc_profile=result.icc_profile, quality=quality)
        height, width = result.pixels.shape[:2]
        timings = {"decode": round(decode_ms, 1), **result.timings_ms,
                   "encode": round((time.perf_counter() - encode_started) * 1000, 1),
                   "total": round((time.perf_counter() - started) * 1000, 1)}
        if "application/json" in request.headers.get("accept", ""):
            return {"image_base64": base64.b64encode(body).decode("ascii"), "width": width, "height": height,
                    "format": fmt, "model": result.model, "backend": result.backend, "scale": result.scale,
                    "timings_ms": timings}
        return Response(body, media_type=imageio.MEDIA_TYPES[fmt], headers={
            "X-Imagemesh-Model": result.model, "X-Imagemesh-Backend": result.backend,
            "X-Imagemesh-Size": f"{width}x{height}",
            "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings.items())})

    return app
