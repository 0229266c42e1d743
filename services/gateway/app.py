"""REST/JSON in front of the gRPC services: the app, its middleware and errors."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common import logs, metrics
from services.common.config import Config
from services.common.errors import ServiceError

from . import compat, v1, web
from .core import Gateway, error_response
from .errors import HttpError, from_service_error

logger = logging.getLogger("imagemesh.gateway")


class RequestContext:
    """Request id (the caller's X-Request-ID, or a new one) for logs and answers, HTTP
    metrics, a log line per request, and a JSON 500 for anything unexpected. Plain
    ASGI, so that streamed answers pass straight through and endpoints can tell
    when their client has gone away."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = given or logs.new_request_id()
        token = logs.request_id_var.set(request_id)
        started = time.perf_counter()
        metrics.HTTP_IN_FLIGHT.inc()
        state = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if not state["started"]:
                await error_response(500, "internal", "internal error; quote the request id when reporting it")(
                    scope, receive, send_with_id)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(state["status"])).inc()
            metrics.HTTP_SECONDS.labels(route, scope["method"]).observe(time.perf_counter() - started)
            logs.log(logger, logging.INFO, "request", method=scope["method"], path=scope["path"],
                     status=state["status"], ms=round((time.perf_counter() - started) * 1000, 1))
            logs.request_id_var.reset(token)


def create_app(config: Config) -> FastAPI:
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(title="imagemesh", version="1.0", lifespan=lifespan, description=(
        "AI image processing over a gRPC mesh: Real-ESRGAN upscaling, background removal and effects, "
        "alone or as pipelines that stream tile by tile through the services. The `/v1` routes are the "
        "primary API; the others keep clients of earlier services working."))
    app.state.gateway = gw

    bearer = HTTPBearer(auto_error=False, description="one of the gateway's API_TOKENS (when any are set)")

    async def guarded(request: Request, _: HTTPAuthorizationCredentials | None = Security(bearer)) -> str:
        return await gw.guard(request)
    protected = [Depends(guarded)]

    app.add_middleware(RequestContext)

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

    v1.register(app, gw, protected)
    compat.register(app, gw, protected)
    web.register(app, gw, protected)
    return app
