"""What Envoy asks the gateway: whether a public gRPC call may pass (ext_authz)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from ..deps import guarded

router = APIRouter()
ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@router.api_route("/internal/authz/{path:path}", methods=ANY_METHOD, include_in_schema=False)
async def authorize(path: str, request: Request, identity: str = Depends(guarded)) -> Response:
    """200 lets the call through; the guard answers 401 (token) or 429 (rate limit) as
    for REST, which Envoy returns to the gRPC client as UNAUTHENTICATED or UNAVAILABLE."""
    return Response(status_code=200)
