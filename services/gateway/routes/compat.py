"""Routes that keep clients of the four services our users come from working
(../shared/seeds): same paths, same fields. The /v1 routes stay primary."""

from __future__ import annotations

import base64
import resource
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from imagemesh.v1 import pipeline_pb2

from services.common import metrics, wire
from services.common.failures import bad
from services.common.fields import Fields, load_json
from services.common.steps import effect_step, remove_background_options, upscale_step

from ..core import Gateway
from ..deps import PROTECTED, gateway
from ..errors import HttpError
from ..fields import (
    CANDIDATES,
    CATALOGUE,
    FORMAT,
    IMAGE_ANSWER,
    IMAGE_TYPES,
    PROCESSING_ERRORS,
    QUALITY,
    REMOVAL_ANSWER,
    REMOVE,
    UPSCALE,
    Field,
    complete,
    errors,
    group,
    image_body,
    json_answer,
)
from ..inputs import check_json, image_from_json
from ..jobs import _iso
from .v1 import cache_hit_rate

router = APIRouter(tags=["compatible"])

SUPPORTED_SCALES = [2, 4, 8]
MAX_SHOTGUN = 8
# The earlier services' own fields.
OUTPUT_FORMAT = Field(
    "output_format", "string", "output format", choices=("png", "jpeg", "webp"), aliases=(("jpg", "jpeg"),)
)
OUTPUT_EXT = Field(
    "output_ext", "string", "output format of the stored file", default="png", choices=("png", "jpg", "jpeg", "webp")
)
DOWNLOAD_QUALITY = replace(QUALITY, default=95)
SHOTGUN = Field("shotgun", "boolean", "every ready general model, and the keyer: JSON candidates", default=False)
UPSCALE_MODEL = Field("upscale_model", "string", "the upscaling model", default="auto")
EFFECTS = Field(
    "effects",
    "names",
    'effect names: a JSON list, e.g. ["blackwhite"], or comma-separated',
    value_schema={CATALOGUE: "effect-name"},
)
EFFECT_PARAMS = Field(
    "effect_params",
    "json",
    'parameters per effect, e.g. {"blackwhite": {"contrast_boost": 1.15}}',
    value_schema={"type": "object", "additionalProperties": {"type": "object"}, CATALOGUE: "params-by-effect"},
)
SEED_UPSCALE_ANSWER = json_answer("success, sizes, model, backend and base64_image")


def _size_text(width: int, height: int) -> str:
    return f"{width}x{height}"


def _runs_network(backend: str) -> bool:
    """Whether a model runs a Real-ESRGAN network (any backend) rather than the Lanczos fallback."""
    return backend not in ("", "lanczos")


def _quality_name(backend: str) -> tuple[str, str]:
    """What the first seed calls a backend: its Real-ESRGAN one, or the PIL fallback."""
    return ("realesrgan", "high") if _runs_network(backend) else ("pil", "basic")


def _memory_mb() -> dict:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                info[key] = round(int(value.split()[0]) / 1024, 1)
    return {"total_mb": info.get("MemTotal"), "available_mb": info.get("MemAvailable")}


def _metric_sum(metric, name: str) -> float:
    """The sum of a metric's samples called `name`, over all label values."""
    return sum(sample.value for family in metric.collect() for sample in family.samples if sample.name == name)


async def upscaler_state(gw: Gateway):
    replies = await gw.mesh.list_models()
    upscaler = replies["upscaler"]
    ready = {m.name: m for m in upscaler.models if m.ready}
    return upscaler.default_model, ready, replies["bgremoval"]


@router.get(
    "/health",
    summary="Service health (the fields of the earlier upscaler and background-removal APIs)",
    responses={200: json_answer("healthy"), 503: json_answer("a service is not serving")},
)
async def health(gw: Gateway = Depends(gateway)):
    statuses = await gw.mesh.health()
    healthy = all(s == "SERVING" for s in statuses.values())
    body: dict[str, Any] = {
        "status": "healthy" if healthy else "unhealthy",
        "services": statuses,
        "supported_scales": SUPPORTED_SCALES,
        "max_file_size": f"{gw.config.max_upload_bytes // 2**20}MB",
        "system_memory": _memory_mb(),
    }
    if statuses.get("upscaler") == "SERVING":
        default, ready, bgremoval = await upscaler_state(gw)
        backend = ready[default].backend
        body.update(
            backend=_quality_name(backend)[0],
            backend_quality=_quality_name(backend)[1],
            available_backends={
                "realesrgan": any(_runs_network(m.backend) for m in ready.values()),
                "pil": True,
                "ncnn": any(m.backend == "ncnn" for m in ready.values()),
            },
            model_loaded=any(m.ready and m.name != "keyer" for m in bgremoval.models),
        )
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get(
    "/status",
    dependencies=PROTECTED,
    summary="Detailed status: services, models, limits, jobs, memory",
    responses={200: json_answer("status"), **errors(401, 429, 503)},
)
async def status(request: Request, gw: Gateway = Depends(gateway)):
    statuses = await gw.mesh.health()
    replies = await gw.mesh.list_models()
    return {
        "status": "healthy" if all(s == "SERVING" for s in statuses.values()) else "unhealthy",
        "version": request.app.version,
        "uptime_seconds": round(time.time() - gw.started, 1),
        "services": statuses,
        "models": {
            service: {
                "default": reply.default_model,
                "ready": [m.name for m in reply.models if m.ready],
                "not_ready": {m.name: m.not_ready_reason for m in reply.models if not m.ready},
            }
            for service, reply in replies.items()
        },
        "limits": {
            "max_upload_bytes": gw.config.max_upload_bytes,
            "max_input_pixels": gw.config.max_input_pixels,
            "max_output_pixels": gw.config.max_output_pixels,
            "supported_scales": SUPPORTED_SCALES,
        },
        "auth_required": gw.auth.enabled,
        "jobs": await gw.state.job_counts(),
        "system_memory": _memory_mb(),
    }


@router.get("/models", summary="Upscaling models", responses={200: json_answer("the models"), **errors(503)})
async def models(gw: Gateway = Depends(gateway)):
    reply = (await gw.mesh.list_models())["upscaler"]
    return {
        "default": reply.default_model,
        "models": [
            {
                "name": m.name,
                "available": m.ready,
                "scale": m.scale,
                "backend": m.backend,
                "description": m.description,
                "reason": m.not_ready_reason,
                "license": m.license,
            }
            for m in reply.models
        ],
    }


async def seed_upscale_json(gw: Gateway, fields: Fields, data: bytes, started: float) -> dict:
    """Upscale, answered with the first seed's fields."""
    step = upscale_step(fields)
    requested_format, quality = gw.output_options(fields, default_format="png")
    image, _ = await gw.decode(data)
    result = await gw.mesh.process(image, [step])
    fmt, body, _ = await gw.encode(result, requested_format, image.format, quality)
    report = result.reports[0]
    backend, quality_level = _quality_name(report.backend)
    height, width = result.pixels.shape[:2]
    return {
        "success": True,
        "original_size": _size_text(image.width, image.height),
        "upscaled_size": _size_text(width, height),
        "scale_used": float(report.details["scale"]),
        "model_used": report.name,
        "backend": backend,
        "backend_quality": quality_level,
        "format": fmt.upper(),
        "memory_used_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "processing_time": round(time.perf_counter() - started, 3),
        "processing_info": {
            "backend": report.backend,
            "tile_size": int(report.details["tile_size"]),
            "quality_level": quality_level,
            "original_format": image.format.upper(),
            "model_passes": int(report.details["model_passes"]),
        },
        "base64_image": base64.b64encode(body).decode("ascii"),
    }


async def download_answer(gw: Gateway, request: Request, body: object, started: float) -> dict:
    """Upscale, stored, answered with a download link (the second seed)."""
    req = await image_from_json(body, gw.fetcher.fetch, DOWNLOAD_IMAGE_FIELDS)
    ext = OUTPUT_EXT.read(req.fields)
    fmt = "jpeg" if ext == "jpg" else ext
    step = upscale_step(req.fields)
    quality = DOWNLOAD_QUALITY.read(req.fields)
    image, _ = await gw.decode(req.data)
    run = await gw.run_to_store(image, [step], fmt, quality)
    report = run.steps[0]
    return {
        "download_url": f"{str(request.base_url).rstrip('/')}/download/{run.stored.file_id}",
        "file_id": run.stored.file_id,
        "original_size": [image.width, image.height],
        "upscaled_size": [run.width, run.height],
        "expires_at": _iso(run.stored.expires_at),
        "output_format": "jpg" if run.stored.format == "jpeg" else run.stored.format,
        "model_used": report["name"],
        "backend": report["backend"],
        "processing_time": round(time.perf_counter() - started, 3),
    }


DOWNLOAD_IMAGE_FIELDS = ("image", "image_base64")
SEED_UPSCALE = group(*[f for name, f in UPSCALE.items() if name in ("scale", "model")])


@router.post(
    "/upscale",
    dependencies=PROTECTED,
    summary="Upscale: multipart answers JSON with base64_image; a JSON body (image or image_url, "
    "scale, output_ext) answers a download_url",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                **image_body({**UPSCALE, "format": FORMAT, "quality": QUALITY})["content"],
                "application/json": image_body(
                    {**SEED_UPSCALE, "output_ext": OUTPUT_EXT, "quality": DOWNLOAD_QUALITY},
                    base64_fields=DOWNLOAD_IMAGE_FIELDS,
                )["content"]["application/json"],
            },
        }
    },
    responses={
        200: json_answer("multipart: success, sizes, base64_image; JSON: download_url, file_id"),
        **errors(*PROCESSING_ERRORS),
    },
)
async def upscale(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        req = await gw.read(request)
        return await seed_upscale_json(gw, req.fields, req.data, started)
    # curl -d sends JSON as application/x-www-form-urlencoded: the body says what it is
    body = load_json(
        await request.body(), "the body (multipart/form-data with 'file', or JSON with 'image' or 'image_url')"
    )
    return await download_answer(gw, request, body, started)


@router.get("/upscale", include_in_schema=False)  # usage help for people trying the URL: GET is not allowed
async def upscale_usage():
    return JSONResponse(
        status_code=405,
        headers={"Allow": "POST"},
        content={
            "error": {"code": "method_not_allowed", "message": "use POST /upscale"},
            "usage": {
                "multipart": "curl -F file=@image.jpg -F scale=4 /upscale  -> JSON with base64_image",
                "json": 'curl -H "Authorization: Bearer TOKEN" -d \'{"image_url": "https://...", "scale": 4, '
                '"output_ext": "png"}\' /upscale  -> JSON with download_url',
                "fields": {
                    "scale": "1 to 8 (2, 4, 8 common)",
                    "model": "auto or a name from GET /models",
                    "output_ext": "png or jpg",
                },
                "docs": "/docs",
            },
        },
    )


@router.post(
    "/upscale-base64",
    dependencies=PROTECTED,
    summary="Upscale base64 JSON (image_base64, scale, model, format); answers JSON with base64_image",
    openapi_extra={"requestBody": image_body({**UPSCALE, "format": FORMAT, "quality": QUALITY}, forms=False)},
    responses={200: SEED_UPSCALE_ANSWER, **errors(*PROCESSING_ERRORS)},
)
async def upscale_base64(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    return await seed_upscale_json(gw, req.fields, req.data, started)


@router.get(
    "/download/{file_id}",
    summary="A stored result, until it expires",
    response_class=Response,
    responses={200: {"description": "the image", "content": IMAGE_TYPES}, **errors(404)},
)
async def download(file_id: str, gw: Gateway = Depends(gateway)):
    return await gw.stored_response(file_id, HttpError(404, "not_found", "no such file, or it has expired"))


@router.post(
    "/remove-background",
    dependencies=PROTECTED,
    summary="Remove the background (output_format, quality, use_cache); with models or shotgun=true, JSON candidates",
    openapi_extra={
        "requestBody": image_body(
            {**REMOVE, "models": CANDIDATES, "shotgun": SHOTGUN, "output_format": OUTPUT_FORMAT, "quality": QUALITY}
        )
    },
    responses=REMOVAL_ANSWER,
)
async def remove_background(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    models = CANDIDATES.read(req.fields)
    if not models and SHOTGUN.read(req.fields):
        bgremoval = (await gw.mesh.list_models())["bgremoval"]
        models = [m.name for m in bgremoval.models if m.ready and m.kind == "general"][: MAX_SHOTGUN - 1]
        models.append("keyer")
    if models:
        return await gw.candidates(req, models, started, format_field="output_format")
    step = pipeline_pb2.Step(remove_background=remove_background_options(req.fields))
    return await gw.answer(request, req, [step], started, format_field="output_format")


@router.post(
    "/process",
    dependencies=PROTECTED,
    summary="Remove the background, then upscale (scale, default 4)",
    openapi_extra={
        "requestBody": image_body(
            {
                "model": REMOVE["model"],
                "upscale_model": UPSCALE_MODEL,
                "scale": UPSCALE["scale"],
                "output_format": replace(OUTPUT_FORMAT, default="png"),
                "quality": QUALITY,
            }
        )
    },
    responses=IMAGE_ANSWER,
)
async def process(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    fields = req.fields
    upscale = Fields(
        {"model": UPSCALE_MODEL.read(fields), **{k: v for k, v in fields.values.items() if k == "scale"}},
        form=fields.form,
    )
    steps = [pipeline_pb2.Step(remove_background=remove_background_options(fields)), upscale_step(upscale)]
    return await gw.answer(request, req, steps, started, format_field="output_format", default_format="png")


@router.post(
    "/api/v2/process",
    dependencies=PROTECTED,
    summary="Effects (effects: JSON list, effect_params: JSON object per effect); answers JSON",
    openapi_extra={
        "requestBody": image_body(
            {"effects": EFFECTS, "effect_params": EFFECT_PARAMS, "output_format": OUTPUT_FORMAT, "quality": QUALITY},
            ("effects",),
        )
    },
    responses={
        200: json_answer("success, image (base64), format, size, effects_applied"),
        **errors(*PROCESSING_ERRORS),
    },
)
async def effects_v2(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    effects = EFFECTS.read(req.fields)
    if not effects:
        raise bad('effects must name at least one effect, e.g. ["blackwhite"]')
    params = EFFECT_PARAMS.read(req.fields)
    params = {} if params is None or params == "" else params
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise bad('effect_params must be a JSON object of objects, e.g. {"blackwhite": {"grain_strength": 0.1}}')
    await gw.load_effects()
    if gw.effects is not None:  # entries of effects not applied are checked too, against the catalogue
        check_json(params, complete({"type": "object", CATALOGUE: "params-by-effect"}, gw.effects), "effect_params")
    steps = [effect_step(Fields({"effect": name}), params.get(name, {})) for name in effects]
    requested_format, quality = gw.output_options(req.fields, format_field="output_format")
    image, decode_ms = await gw.decode(req.data)
    result = await gw.mesh.process(image, steps)
    fmt, body, _ = await gw.encode(result, requested_format, image.format, quality)
    height, width = result.pixels.shape[:2]
    encoded = base64.b64encode(body).decode("ascii")
    return {
        "success": True,
        "image": encoded,
        "image_base64": encoded,
        "format": fmt,
        "width": width,
        "height": height,
        "effects_applied": effects,
        "effect_params": {k: v for k, v in result.reports[0].details.items() if "." in k},
        "processing_time": round(time.perf_counter() - started, 3),
        "steps": [wire.as_json(r) for r in result.reports],
    }


@router.get(
    "/model-info",
    summary="The default background-removal model",
    responses={200: json_answer("the model"), **errors(503)},
)
async def model_info(gw: Gateway = Depends(gateway)):
    reply = (await gw.mesh.list_models())["bgremoval"]
    by_name = {m.name: m for m in reply.models}
    model = by_name[reply.default_model]
    return {
        "status": "loaded" if model.ready else "not_loaded",
        "model": model.name,
        "total_parameters": model.parameters,
        "model_size_mb": round(model.file_bytes / 2**20, 1),
        "target_size": model.input_size,
        "backend": model.backend,
        "license": model.license,
        "models": [
            {"name": m.name, "ready": m.ready, "kind": m.kind, "target_size": m.input_size} for m in reply.models
        ],
    }


@router.get(
    "/stats",
    dependencies=PROTECTED,
    summary="Usage statistics",
    responses={200: json_answer("statistics"), **errors(401, 429, 503)},
)
async def stats(gw: Gateway = Depends(gateway)):
    reply = await gw.mesh.stats()
    bgremoval = (await gw.mesh.list_models())["bgremoval"]
    return {
        "requests_total": int(_metric_sum(metrics.HTTP_REQUESTS, "imagemesh_http_requests_total")),
        "cache_hit_rate": cache_hit_rate(reply),
        "active_requests": int(_metric_sum(metrics.HTTP_IN_FLIGHT, "imagemesh_http_requests_in_flight")),
        "model_memory_mb": round(sum(m.file_bytes for m in bgremoval.models if m.ready) / 2**20, 1),
        "cache_entries": reply.cache_entries,
        "background_removals": reply.requests,
        "choices_recorded": reply.choices,
        "uptime_seconds": round(time.time() - gw.started, 1),
        "jobs_queued": (await gw.state.job_counts())["queued"],
    }
