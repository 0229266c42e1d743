"""What route handlers depend on: the gateway of the app, and the guard
(bearer token, then rate limit) of every processing route."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .core import Gateway

BEARER = HTTPBearer(auto_error=False, description="one of the gateway's API_TOKENS (when any are set)")


def gateway_of(app: FastAPI) -> Gateway:
    """The app's gateway, built when the app starts serving."""
    gateway: Gateway = app.state.gateway
    return gateway


def gateway(request: Request) -> Gateway:
    return gateway_of(request.app)


async def guarded(request: Request, _: HTTPAuthorizationCredentials | None = Security(BEARER)) -> str:
    """The caller's identity, once its token (when tokens are set) and its rate limit allow it."""
    return await gateway(request).guard(request)


PROTECTED = [Depends(guarded)]


def api_routes(app: FastAPI) -> list[APIRoute]:
    """The app's API routes, those of included routers too, in the order they match."""
    return [
        context.original_route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
    ]
