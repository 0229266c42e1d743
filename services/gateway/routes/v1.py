"""The primary API: /v1 image routes, catalogues and background-removal choices."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from imagemesh.v1 import pipeline_pb2

from services.common import wire
from services.common.failures import bad
from services.common.fields import Fields, load_json
from services.common.steps import effect_step, parse_steps, remove_background_options, upscale_step

from ..core import Gateway
from ..deps import PROTECTED, gateway
from ..fields import (
    CANDIDATES,
    EFFECT,
    IMAGE_ANSWER,
    OUTPUT,
    REMOVAL_ANSWER,
    REMOVE,
    STEPS,
    UPSCALE,
    errors,
    image_body,
    json_answer,
)

router = APIRouter(tags=["v1"])

# Multipart fields of /v1/effects that are not effect parameters.
EFFECT_RESERVED = {"file", "effect", "params", "format", "quality", "image_base64", "image_url"}


def cache_hit_rate(stats) -> float:
    lookups = stats.cache_hits + stats.cache_misses
    return stats.cache_hits / lookups if lookups else 0.0


def effect_from(f: Fields) -> pipeline_pb2.Step:
    """The effect with `params` (JSON), or in a form with every field that is not reserved as a parameter."""
    if EFFECT["params"].read(f) is None and f.form:
        return effect_step(f, {k: v for k, v in f.values.items() if k not in EFFECT_RESERVED}, loose=True)
    return effect_step(f)


@router.get(
    "/v1/models",
    summary="Every model of every service, with readiness and backend",
    responses={200: json_answer("models and each service's default"), **errors(503)},
)
async def list_models(gw: Gateway = Depends(gateway)):
    replies = await gw.mesh.list_models()
    return {
        "models": [dict(wire.as_json(m), service=service) for service, reply in replies.items() for m in reply.models],
        "defaults": {service: reply.default_model for service, reply in replies.items()},
    }


@router.get(
    "/v1/effects",
    summary="Every effect with its parameters, ranges and options",
    responses={200: json_answer("the effects"), **errors(503)},
)
async def list_effects(gw: Gateway = Depends(gateway)):
    return wire.as_json(await gw.mesh.list_effects())


@router.post(
    "/v1/upscale",
    summary="Upscale an image with Real-ESRGAN (or Lanczos)",
    dependencies=PROTECTED,
    openapi_extra={"requestBody": image_body({**UPSCALE, **OUTPUT})},
    responses=IMAGE_ANSWER,
)
async def upscale(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    return await gw.answer(
        request,
        req,
        [upscale_step(req.fields)],
        started,
        lambda result: {"scale": float(result.reports[0].details["scale"])},
    )


@router.post(
    "/v1/remove-background",
    summary="Remove the background (one model, or candidates)",
    dependencies=PROTECTED,
    openapi_extra={"requestBody": image_body({**REMOVE, "models": CANDIDATES, **OUTPUT})},
    responses=REMOVAL_ANSWER,
)
async def remove_background(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    models = CANDIDATES.read(req.fields)
    if not models:
        step = pipeline_pb2.Step(remove_background=remove_background_options(req.fields))
        return await gw.answer(request, req, [step], started)
    return await gw.candidates(req, models, started)


@router.post(
    "/v1/remove-background/choice",
    summary="Record which candidate the user picked",
    dependencies=PROTECTED,
    responses={200: json_answer("the recorded pick"), **errors(400, 401, 404, 429)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["request_id", "model"],
                        "properties": {
                            "request_id": {"type": "string", "minLength": 1},
                            "model": {"type": "string", "minLength": 1},
                        },
                    }
                }
            },
        }
    },
)
async def record_choice(request: Request, gw: Gateway = Depends(gateway)):
    body = load_json(await request.body(), "the body")
    if not isinstance(body, dict):
        raise bad("the body must be JSON {request_id, model}")
    fields = Fields(body)
    request_id, model = fields.text("request_id", ""), fields.text("model", "")
    if not request_id or not model:
        raise bad("request_id and model are required")
    return wire.as_json(await gw.mesh.record_choice(request_id, model))


@router.get(
    "/v1/remove-background/stats",
    summary="Picks, share and mean latency per model",
    dependencies=PROTECTED,
    responses={200: json_answer("statistics"), **errors(401, 429, 503)},
)
async def removal_stats(gw: Gateway = Depends(gateway)):
    reply = await gw.mesh.stats()
    return {
        "models": [
            {
                "model": m.model,
                "runs": m.runs,
                "offered": m.offered,
                "picks": m.picks,
                "share": m.share,
                "pick_rate": m.pick_rate,
                "mean_ms": round(m.mean_ms, 1),
            }
            for m in reply.models
        ],
        "choices": reply.choices,
        "requests": reply.requests,
        "cache_hits": reply.cache_hits,
        "cache_misses": reply.cache_misses,
        "cache_hit_rate": cache_hit_rate(reply),
        "cache_bytes": reply.cache_bytes,
        "cache_entries": reply.cache_entries,
    }


@router.post(
    "/v1/effects",
    summary="Apply an effect (its parameters as `params`, or as form fields)",
    dependencies=PROTECTED,
    openapi_extra={"requestBody": image_body({**EFFECT, **OUTPUT}, ("effect",), catalogue="effect-and-params")},
    responses=IMAGE_ANSWER,
)
async def apply_effect(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    return await gw.answer(request, req, [effect_from(req.fields)], started)


@router.post(
    "/v1/process",
    summary="Run a pipeline of steps, streamed through the services",
    dependencies=PROTECTED,
    openapi_extra={"requestBody": image_body({"steps": STEPS, **OUTPUT}, ("steps",))},
    responses=IMAGE_ANSWER,
)
async def process(request: Request, gw: Gateway = Depends(gateway)):
    started = time.perf_counter()
    req = await gw.read(request)
    return await gw.answer(request, req, parse_steps(req.fields), started)
