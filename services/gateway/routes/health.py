"""Liveness, readiness and the gateway's own metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..core import Gateway
from ..deps import gateway

router = APIRouter(tags=["health"])
READINESS = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ready", "not_ready"]}, "upstreams": {"type": "object"}},
}


@router.get(
    "/healthz",
    summary="Liveness: the gateway process answers",
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every service reports SERVING",
    responses={
        200: {"description": "ready", "content": {"application/json": {"schema": READINESS}}},
        503: {"description": "a service is not serving", "content": {"application/json": {"schema": READINESS}}},
    },
)
async def readyz(gw: Gateway = Depends(gateway)):
    statuses = await gw.mesh.health()
    ready = all(status == "SERVING" for status in statuses.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "upstreams": statuses}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of the gateway",
    response_class=Response,
    responses={
        200: {"description": "the Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def prometheus_metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
