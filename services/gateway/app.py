"""REST/JSON in front of the gRPC services: the app, its middleware and errors."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common import logs, metrics
from services.common.errors import ServiceError
from services.common.mesh import MeshClient

from .budget import request_holds
from .config import GatewayConfig
from .core import Gateway, error_response
from .deps import api_routes, gateway_of
from .errors import AnswerAborted, HttpError, from_service_error
from .fields import complete
from .inputs import SMALL_BODY_BYTES, body_limit
from .routes import compat, health, internal, jobs, v1, web

logger = logging.getLogger("imagemesh.gateway")


# Routes that take no image read at most SMALL_BODY_BYTES.
SMALL_BODY_ROUTES = ("/v1/remove-background/choice",)


class RequestContext:
    """Request id (the caller's X-Request-ID, or a new one) for logs and answers, HTTP
    metrics, a log line per request, a bound on every request body (counted as it
    arrives, chunked or not: 413 past it), and a JSON 500 for anything unexpected.
    Plain ASGI, so that streamed answers pass straight through and endpoints can
    tell when their client has gone away."""

    def __init__(self, app, max_upload_bytes: int, write_timeout: float):
        self.app = app
        self.body_limit = body_limit(max_upload_bytes)
        self.write_timeout = write_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = logs.request_id_or_new(
            dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        )
        token = logs.request_id_var.set(request_id)
        started = time.perf_counter()
        metrics.HTTP_IN_FLIGHT.inc()
        state = {"status": 500, "started": False}
        limit = SMALL_BODY_BYTES if scope["path"] in SMALL_BODY_ROUTES else self.body_limit
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HttpError(413, "upload_too_large", f"the request body is over {limit} bytes")
            return message

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            try:  # a client that stops reading must not hold the services' streams for ever
                await asyncio.wait_for(send(message), self.write_timeout)
            except asyncio.TimeoutError:
                raise AnswerAborted(f"the client read nothing for {self.write_timeout:g} s") from None

        holds = request_holds.set([])
        try:
            await self.app(scope, receive_within_limit, send_with_id)
        except AnswerAborted as exc:
            logs.log(logger, logging.WARNING, "answer abandoned midway", error=str(exc))
        except HttpError as exc:  # raised outside an endpoint (the body limit, in a parser)
            if not state["started"]:
                await error_response(exc.status, exc.reason, exc.message, exc.headers)(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if not state["started"]:
                await error_response(500, "internal", "internal error; quote the request id when reporting it")(
                    scope, receive, send_with_id
                )
        finally:
            for hold in request_holds.get() or ():  # its answer has ended: its pixels are gone
                hold.release()
            request_holds.reset(holds)
            metrics.HTTP_IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(state["status"])).inc()
            metrics.HTTP_SECONDS.labels(route, scope["method"]).observe(time.perf_counter() - started)
            logs.log(
                logger,
                logging.INFO,
                "request",
                method=scope["method"],
                path=scope["path"],
                status=state["status"],
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
            logs.request_id_var.reset(token)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route takes at `path` (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in api_routes(app):
        if route.include_in_schema and route.path_regex.match(path):
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class GatewayApi(FastAPI):
    """FastAPI whose OpenAPI document is this gateway's as configured: bearer security
    only where tokens are set (with its 401), image_url only where URL fetching is on,
    and each effect's parameters from the effects service's catalogue (kept once it was read)."""

    def __init__(self, config: GatewayConfig, **settings: Any):
        super().__init__(**settings)
        self.gateway_config = config

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        document = copy.deepcopy(
            get_openapi(title=self.title, version=self.version, description=self.description, routes=self.routes)
        )  # the routes' declarations stay as they are
        auth = bool(self.gateway_config.api_tokens.strip())
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                if not auth:
                    operation.pop("security", None)
                    if "security" not in operation:
                        operation.get("responses", {}).pop("401", None)
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    body = media.get("schema", {})
                    if not self.gateway_config.url_fetch_enabled and "image_url" in body.get("properties", {}):
                        del body["properties"]["image_url"]
                        body["oneOf"] = [alt for alt in body.get("oneOf", []) if alt["required"] != ["image_url"]]
        if not auth:
            document.get("components", {}).pop("securitySchemes", None)
        effects = gateway_of(self).effects
        document = complete(document, effects)
        if effects is not None:
            self.openapi_schema = document
        return document


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with Gateway(
            config,
            MeshClient(
                config.addresses,
                config.upstream_timeout_seconds,
                upscale_fanout=config.upscale_fanout,
                upscale_band_rows=config.upscale_band_rows,
            ),
        ).running() as gw:
            app.state.gateway = gw
            yield

    app = GatewayApi(
        config,
        title="imagemesh",
        version="1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        description=(
            "AI image processing over a gRPC mesh: Real-ESRGAN upscaling, background removal and effects, "
            "alone or as pipelines that stream tile by tile through the services. The `/v1` routes are the "
            "primary API; the others keep clients of earlier services working."
        ),
    )
    app.add_middleware(
        RequestContext, max_upload_bytes=config.max_upload_bytes, write_timeout=config.client_write_timeout_seconds
    )

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
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return error_response(exc.status_code, reason, str(exc.detail), headers)

    for module in (health, v1, jobs, compat, web, internal):
        app.include_router(module.router)
    app.mount("/static", web.static_files, name="static")
    app.mount("/docs/assets", web.swagger_files, name="docs-assets")
    return app
