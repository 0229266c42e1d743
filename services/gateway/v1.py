"""The primary API: /v1 routes, jobs included."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagemesh.v1 import pipeline_pb2

from .core import FORMAT_CHOICES, Gateway
from .errors import HttpError
from .inputs import ALPHA_MODES, Fields, bad, effect_step, parse_steps, remove_background_options, upscale_step

# Multipart fields of /v1/effects that are not effect parameters.
EFFECT_RESERVED = {"file", "effect", "params", "format", "quality", "image_base64", "image_url"}
EVENT_KEEPALIVE_SECONDS = 15


def to_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def image_body(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """The OpenAPI request body of an image route: multipart or JSON."""
    common = {
        "format": {"type": "string", "enum": list(FORMAT_CHOICES), "default": "auto",
                   "description": "auto keeps the input's format, PNG when alpha would be lost"},
        "quality": {"type": "integer", "default": 92, "minimum": 1, "maximum": 100},
    }
    url = {"image_url": {"type": "string", "format": "uri",
                         "description": "fetch the image from a public http(s) URL instead"}}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": list(required), "properties": {
            "file": {"type": "string", "format": "binary", "description": "the image"}, **url, **properties,
            **common}}},
        "application/json": {"schema": {"type": "object", "required": list(required), "properties": {
            "image_base64": {"type": "string", "description": "the image, base64 (a data: URL is fine)"},
            **url, **properties, **common}}},
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
ERRORS = {code: {"description": text} for code, text in (
    (400, "invalid parameter"), (401, "missing or wrong bearer token"), (404, "unknown model"),
    (413, "image or output too large"), (415, "unsupported media type"), (422, "not a decodable image"),
    (429, "rate limited or busy, see Retry-After"), (503, "model not ready or service unavailable"),
    (504, "upstream timeout"))}
IMAGE_RESPONSES = {
    200: {"description": "the image (or JSON with `Accept: application/json`)",
          "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {"schema": {
              "type": "object", "properties": {k: {} for k in (
                  "image_base64", "width", "height", "format", "model", "backend", "steps", "timings_ms")}}}}},
    **ERRORS,
}


def cache_hit_rate(stats) -> float:
    lookups = stats.cache_hits + stats.cache_misses
    return stats.cache_hits / lookups if lookups else 0.0


def effect_params(f: Fields):
    """`params` as JSON, or (multipart) every field that is not reserved."""
    params = f.structured("params", None)
    if params is None:
        params = {k: v for k, v in f.values.items() if k not in EFFECT_RESERVED and isinstance(v, str)}
    return params


def register(app: FastAPI, gw: Gateway, protected: list) -> None:
    @app.get("/healthz", tags=["health"], summary="Liveness: the gateway process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every service reports SERVING",
             responses={503: {"description": "a service is not serving"}})
    async def readyz():
        statuses = await gw.mesh.health()
        ready = all(status == "SERVING" for status in statuses.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "upstreams": statuses},
                            status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of the gateway")
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["v1"], summary="Every model of every service, with readiness and backend")
    async def list_models():
        replies = await gw.mesh.list_models()
        return {"models": [dict(to_dict(m), service=service) for service, reply in replies.items()
                           for m in reply.models],
                "defaults": {service: reply.default_model for service, reply in replies.items()}}

    @app.get("/v1/effects", tags=["v1"], summary="Every effect with its parameters, ranges and options")
    async def list_effects():
        return to_dict(await gw.mesh.list_effects())

    @app.post("/v1/upscale", tags=["v1"], summary="Upscale an image with Real-ESRGAN (or Lanczos)",
              dependencies=protected, openapi_extra={"requestBody": image_body(UPSCALE_FIELDS)},
              responses=IMAGE_RESPONSES)
    async def upscale(request: Request):
        started = time.perf_counter()
        req = await gw.read(request)
        return await gw.answer(request, req, [upscale_step(req.fields)], started,
                               lambda result: {"scale": float(result.steps[0]["details"]["scale"])})

    @app.post("/v1/remove-background", tags=["v1"], summary="Remove the background (one model, or candidates)",
              dependencies=protected, openapi_extra={"requestBody": image_body(REMOVE_FIELDS)}, responses={
                  **IMAGE_RESPONSES, 200: {"description": "the image; with `models`, JSON candidates "
                                                          "{request_id, candidates: [...]}"}})
    async def remove_background(request: Request):
        started = time.perf_counter()
        req = await gw.read(request)
        models = req.fields.names("models")
        if not models:
            step = pipeline_pb2.Step(remove_background=remove_background_options(req.fields))
            return await gw.answer(request, req, [step], started)
        return await gw.candidates(req, models, started)

    @app.post("/v1/remove-background/choice", tags=["v1"], summary="Record which candidate the user picked",
              dependencies=protected, responses=ERRORS,
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
        return to_dict(await gw.mesh.record_choice(request_id, model))

    @app.get("/v1/remove-background/stats", tags=["v1"], summary="Picks, share and mean latency per model",
             dependencies=protected)
    async def removal_stats():
        reply = await gw.mesh.stats()
        return {
            "models": [{"model": m.model, "runs": m.runs, "offered": m.offered, "picks": m.picks,
                        "share": m.share, "pick_rate": m.pick_rate, "mean_ms": round(m.mean_ms, 1)}
                       for m in reply.models],
            "choices": reply.choices, "requests": reply.requests, "cache_hits": reply.cache_hits,
            "cache_misses": reply.cache_misses, "cache_hit_rate": cache_hit_rate(reply),
            "cache_bytes": reply.cache_bytes, "cache_entries": reply.cache_entries}

    @app.post("/v1/effects", tags=["v1"], summary="Apply an effect", dependencies=protected,
              openapi_extra={"requestBody": image_body(EFFECT_FIELDS, ("effect",))}, responses=IMAGE_RESPONSES)
    async def apply_effect(request: Request):
        started = time.perf_counter()
        req = await gw.read(request)
        return await gw.answer(request, req, [effect_step(req.fields, effect_params(req.fields))], started)

    @app.post("/v1/process", tags=["v1"], summary="Run a pipeline of steps, streamed through the services",
              dependencies=protected, openapi_extra={"requestBody": image_body(PROCESS_FIELDS, ("steps",))},
              responses=IMAGE_RESPONSES)
    async def process(request: Request):
        started = time.perf_counter()
        req = await gw.read(request)
        return await gw.answer(request, req, parse_steps(req.fields.structured("steps")), started)

    # --- jobs ---------------------------------------------------------------

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.post("/v1/jobs", tags=["jobs"], status_code=202, dependencies=protected,
              summary="Start a pipeline as a job (the body of /v1/process); answers its id at once",
              openapi_extra={"requestBody": image_body(PROCESS_FIELDS, ("steps",))},
              responses={202: {"description": "{id, status_url}"}, **ERRORS})
    async def submit_job(request: Request):
        req = await gw.read(request)
        steps = parse_steps(req.fields.structured("steps"))
        fmt, quality = gw.output_options(req.fields)
        image, _ = await gw.decode(req.data)
        await gw.mesh.validate(image, steps)  # refused now for anything /v1/process would refuse before running
        job = gw.jobs.submit(image, steps, fmt, quality)
        status_url = f"{base_url(request)}/v1/jobs/{job.id}"
        return JSONResponse({"id": job.id, "status": job.status, "status_url": status_url}, status_code=202,
                            headers={"Location": status_url})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], dependencies=protected, responses=ERRORS,
             summary="A job's status, progress (tiles done / total), timings and, when done, result_url")
    async def job_status(job_id: str, request: Request):
        return gw.jobs.get(job_id).view(base_url(request))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], dependencies=protected, responses=ERRORS,
             summary="Server-sent events: `progress` while it runs, then `done` or `failed`")
    async def job_events(job_id: str, request: Request):
        job = gw.jobs.get(job_id)
        root = base_url(request)

        async def stream():
            seen = -1
            while True:
                async with job.changed:
                    try:
                        await asyncio.wait_for(job.changed.wait_for(lambda: job.version != seen),
                                               EVENT_KEEPALIVE_SECONDS)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    seen = job.version
                    view = job.view(root)
                event = job.status if job.status in ("done", "failed") else "progress"
                yield f"event: {event}\ndata: {json.dumps(view)}\n\n"
                if event != "progress":
                    return
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"], dependencies=protected,
             summary="The finished image", responses={409: {"description": "not done yet"}, **ERRORS})
    async def job_result(job_id: str):
        job = gw.jobs.get(job_id)
        if job.status != "done":
            raise HttpError(409, "job_not_done", f"the job is {job.status}")
        stored = gw.store.get(job.result.file_id)
        if stored is None:
            raise HttpError(404, "result_expired", "the job's result has expired")
        return gw.stored_response(stored)
