"""REST/JSON in front of the gRPC services."""
from __future__ import annotations

import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagemesh.v1 import pipeline_pb2

from services.common import imageio, logs, metrics
from services.common.config import Config
from services.common.errors import ServiceError

from .errors import HttpError, from_service_error
from .inputs import (ALPHA_MODES, Fields, ImageRequest, bad, effect_step, parse_steps, read_image_request,
                     remove_background_options, upscale_step)
from .mesh import MeshClient, Processed

logger = logging.getLogger("imagemesh.gateway")

FORMAT_CHOICES = ("auto", "png", "jpeg", "webp")
FORMAT_ALIASES = {"jpg": "jpeg"}
# Multipart fields of /v1/effects that are not effect parameters.
EFFECT_RESERVED = {"file", "effect", "params", "format", "quality", "image_base64"}


def _to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _image_body(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """The OpenAPI request body of an image route: multipart or JSON."""
    common = {
        "format": {"type": "string", "enum": list(FORMAT_CHOICES), "default": "auto",
                   "description": "auto keeps the input's format, PNG when alpha would be lost"},
        "quality": {"type": "integer", "default": 92, "minimum": 1, "maximum": 100},
    }
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file", *required], "properties": {
            "file": {"type": "string", "format": "binary", "description": "the image"}, **properties, **common}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64", *required], "properties": {
            "image_base64": {"type": "string", "description": "the image, base64 (a data: URL is fine)"},
            **properties, **common}}},
    }}


UPSCALE_FIELDS = {
    "scale": {"type": "number", "default": 4, "minimum": 1, "maximum": 8},
    "model": {"type": "string", "default": "auto", "description": "a name from GET /v1/models"},
    "tile": {"type": "integer", "default": 0, "description": "inference tile size, 0 for automatic"},
    "alpha": {"type": "string", "enum": list(ALPHA_MODES), "default": "lanczos"},
}
REMOVE_FIELDS = {
    "model": {"type": "string", "default": "auto", "description": "best ready general model, else the keyer"},
    "models": {"type": "string", "description": "several models (comma-separated or a JSON list): JSON candidates"},
    "only_mask": {"type": "boolean", "default": False},
    "bgcolor": {"type": "string", "description": "composite on this colour: #rrggbb, r,g,b or a name"},
    "post_process": {"type": "boolean", "default": False, "description": "binary clean-up of the mask"},
    "refine": {"type": "boolean", "default": False, "description": "guided-filter edge refinement"},
    "alpha_matting": {"type": "boolean", "default": False, "description": "closed-form matting (slow)"},
    "use_cache": {"type": "boolean", "default": True},
    "tolerance": {"type": "integer", "description": "keyer: colour distance to the background (default 32)"},
    "all_similar": {"type": "boolean", "default": False, "description": "keyer: also remove enclosed areas"},
}
EFFECT_FIELDS = {
    "effect": {"type": "string", "description": "a name from GET /v1/effects"},
    "params": {"type": "object", "description": "parameters and options (JSON; in multipart also as fields)"},
}
PROCESS_FIELDS = {
    "steps": {"type": "array", "items": {"type": "object"}, "description":
              'e.g. [{"op": "remove_background", "model": "keyer"}, {"op": "upscale", "scale": 4}, '
              '{"op": "effect", "effect": "blackwhite"}] (a JSON string in multipart)'},
}
IMAGE_RESPONSES = {
    200: {"description": "the image (or JSON with `Accept: application/json`)",
          "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {"schema": {
              "type": "object", "properties": {k: {} for k in (
                  "image_base64", "width", "height", "format", "model", "backend", "steps", "timings_ms")}}}}},
    **{code: {"description": text} for code, text in (
        (400, "invalid parameter"), (404, "unknown model"), (413, "image or output too large"),
        (415, "unsupported media type"), (422, "not a decodable image"), (429, "busy, retry after"),
        (503, "model not ready or service unavailable"), (504, "upstream timeout"))},
}


def error_response(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": reason, "message": message, "request_id": logs.request_id_var.get()}},
                        status_code=status, headers=headers)


def create_app(config: Config) -> FastAPI:
    mesh: dict[str, MeshClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mesh["client"] = MeshClient(config)  # grpc.aio channels belong to the serving event loop
        yield
        await mesh["client"].close()

    app = FastAPI(title="imagemesh", version="1.0", lifespan=lifespan, description=(
        "AI image processing over a gRPC mesh: Real-ESRGAN upscaling, background removal and effects, "
        "alone or as pipelines that stream tile by tile through the services."))

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

    async def decode(data: bytes):
        started = time.perf_counter()
        image = await run_in_threadpool(imageio.decode, data, max_bytes=config.max_upload_bytes,
                                        max_pixels=config.max_input_pixels)
        return image, round((time.perf_counter() - started) * 1000, 1)

    def output_options(fields: Fields) -> tuple[str, int]:
        return (fields.text("format", "auto", FORMAT_CHOICES, FORMAT_ALIASES),
                fields.number("quality", 92, integer=True, minimum=1, maximum=100))

    async def encode(result: Processed, requested_format: str, source_format: str, quality: int):
        fmt = imageio.choose_format(requested_format, source_format, result.mode in ("LA", "RGBA"))
        started = time.perf_counter()
        body = await run_in_threadpool(imageio.encode, result.pixels, result.mode, fmt,
                                       icc_profile=result.icc_profile, quality=quality)
        return fmt, body, round((time.perf_counter() - started) * 1000, 1)

    async def run_steps(request: Request, build: Callable[[Fields], list[pipeline_pb2.Step]],
                        extra_json: Callable[[Processed], dict] = lambda result: {}):
        """Every single-image route: read the request, build its steps (checked before decoding), process."""
        started = time.perf_counter()
        req = await read_image_request(request, config.max_upload_bytes)
        return await process_request(request, req, build(req.fields), started, extra_json)

    async def process_request(request: Request, req: ImageRequest, steps: list[pipeline_pb2.Step], started: float,
                              extra_json: Callable[[Processed], dict] = lambda result: {}):
        requested_format, quality = output_options(req.fields)
        image, decode_ms = await decode(req.data)
        result = await mesh["client"].process(image, steps)
        fmt, body, encode_ms = await encode(result, requested_format, image.format, quality)
        height, width = result.pixels.shape[:2]
        timings = {"decode": decode_ms, **result.timings_ms, "encode": encode_ms,
                   "total": round((time.perf_counter() - started) * 1000, 1)}
        names = ",".join(s["name"] for s in result.steps)
        backends = ",".join(s["backend"] for s in result.steps)
        if "application/json" in request.headers.get("accept", ""):
            return {"image_base64": base64.b64encode(body).decode("ascii"), "width": width, "height": height,
                    "format": fmt, "model": names, "backend": backends, **extra_json(result),
                    "steps": result.steps, "timings_ms": timings}
        return Response(body, media_type=imageio.MEDIA_TYPES[fmt], headers={
            "X-Imagemesh-Model": names, "X-Imagemesh-Backend": backends, "X-Imagemesh-Size": f"{width}x{height}",
            "X-Imagemesh-Steps": ", ".join(f"{s['op']}={s['name']}/{s['backend']}" for s in result.steps),
            "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings.items())})

    @app.get("/healthz", tags=["health"], summary="Liveness: the gateway process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every service reports SERVING",
             responses={503: {"description": "a service is not serving"}})
    async def readyz():
        statuses = await mesh["client"].health()
        ready = all(status == "SERVING" for status in statuses.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "upstreams": statuses},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of the gateway")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["v1"], summary="Every model of every service, with readiness and backend")
    async def list_models():
        replies = await mesh["client"].list_models()
        return {"models": [dict(_to_dict(m), service=service) for service, reply in replies.items()
                           for m in reply.models],
                "defaults": {service: reply.default_model for service, reply in replies.items()}}

    @app.get("/v1/effects", tags=["v1"], summary="Every effect with its parameters, ranges and options")
    async def list_effects():
        return _to_dict(await mesh["client"].list_effects())

    @app.post("/v1/upscale", tags=["v1"], summary="Upscale an image with Real-ESRGAN (or Lanczos)",
              openapi_extra={"requestBody": _image_body(UPSCALE_FIELDS)}, responses=IMAGE_RESPONSES)
    async def upscale(request: Request):
        return await run_steps(request, lambda f: [upscale_step(f)],
                               lambda result: {"scale": float(result.steps[0]["details"]["scale"])})

    @app.post("/v1/remove-background", tags=["v1"], summary="Remove the background (one model, or candidates)",
              openapi_extra={"requestBody": _image_body(REMOVE_FIELDS)}, responses={
                  **IMAGE_RESPONSES, 200: {"description": "the image; with `models`, JSON candidates "
                                                          "{request_id, candidates: [...]}"}})
    async def remove_background(request: Request):
        started = time.perf_counter()
        req = await read_image_request(request, config.max_upload_bytes)
        models = req.fields.names("models")
        if not models:
            step = pipeline_pb2.Step(remove_background=remove_background_options(req.fields))
            return await process_request(request, req, [step], started)
        options = remove_background_options(req.fields, models)
        requested_format, quality = output_options(req.fields)
        image, decode_ms = await decode(req.data)
        request_id, results = await mesh["client"].candidates(image, options)
        candidates = []
        for report, result in results:
            fmt, body, _ = await encode(result, requested_format, image.format, quality)
            height, width = result.pixels.shape[:2]
            candidates.append({"model": report["name"], "backend": report["backend"],
                               "compute_ms": round(report["compute_ms"], 1), "cache_hit": report["cache_hit"],
                               "width": width, "height": height, "format": fmt,
                               "image_base64": base64.b64encode(body).decode("ascii")})
        return {"request_id": request_id, "candidates": candidates,
                "timings_ms": {"decode": decode_ms, "total": round((time.perf_counter() - started) * 1000, 1)}}

    @app.post("/v1/remove-background/choice", tags=["v1"], summary="Record which candidate the user picked",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["request_id", "model"],
                  "properties": {"request_id": {"type": "string"}, "model": {"type": "string"}}}}}}})
    async def record_choice(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise bad("the body must be JSON {request_id, model}") from None
        if not isinstance(body, dict):
            raise bad("the body must be JSON {request_id, model}")
        fields = Fields(body)
        request_id, model = fields.text("request_id", ""), fields.text("model", "")
        if not request_id or not model:
            raise bad("request_id and model are required")
        return _to_dict(await mesh["client"].record_choice(request_id, model))

    @app.get("/v1/remove-background/stats", tags=["v1"], summary="Picks, share and mean latency per model")
    async def removal_stats():
        reply = await mesh["client"].stats()
        lookups = reply.cache_hits + reply.cache_misses
        return {
            "models": [{"model": m.model, "runs": m.runs, "offered": m.offered, "picks": m.picks,
                        "share": m.share, "pick_rate": m.pick_rate, "mean_ms": round(m.mean_ms, 1)}
                       for m in reply.models],
            "choices": reply.choices, "requests": reply.requests, "cache_hits": reply.cache_hits,
            "cache_misses": reply.cache_misses, "cache_hit_rate": reply.cache_hits / lookups if lookups else 0.0,
            "cache_bytes": reply.cache_bytes, "cache_entries": reply.cache_entries}

    @app.post("/v1/effects", tags=["v1"], summary="Apply an effect",
              openapi_extra={"requestBody": _image_body(EFFECT_FIELDS, ("effect",))}, responses=IMAGE_RESPONSES)
    async def apply_effect(request: Request):
        def build(f: Fields):
            params = f.structured("params", None)
            if params is None and not isinstance(f.values.get("params"), dict):
                params = {k: v for k, v in f.values.items() if k not in EFFECT_RESERVED and isinstance(v, str)}
            return [effect_step(f, params)]
        return await run_steps(request, build)

    @app.post("/v1/process", tags=["v1"], summary="Run a pipeline of steps, streamed through the services",
              openapi_extra={"requestBody": _image_body(PROCESS_FIELDS, ("steps",))}, responses=IMAGE_RESPONSES)
    async def process(request: Request):
        return await run_steps(request, lambda f: parse_steps(f.structured("steps")))

    return app
