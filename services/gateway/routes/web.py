"""The web page (static files, no build step), API info at /, and the API docs
with Swagger UI's assets served from here, so that /docs works offline."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..deps import api_routes, gateway, guarded

STATIC = Path(__file__).resolve().parent.parent / "static"
SWAGGER_ASSETS = Path(swagger_ui_bundle.swagger_ui_path)

router = APIRouter(tags=["info"])
static_files = StaticFiles(directory=STATIC)
swagger_files = StaticFiles(directory=SWAGGER_ASSETS)


@router.get(
    "/",
    summary="The web page for browsers (Accept: text/html); API info as JSON otherwise",
    responses={
        200: {
            "description": "the page, or API info",
            "content": {
                "text/html": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}},
            },
        }
    },
)
async def root(request: Request):
    # One URL, two representations: caches must key on Accept.
    if "text/html" in request.headers.get("accept", ""):
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Vary": "Accept"})
    app = request.app
    return JSONResponse(
        headers={"Vary": "Accept"},
        content={
            "name": "imagemesh",
            "version": app.version,
            "description": app.description,
            "docs": "/docs",
            "openapi": "/openapi.json",
            "auth_required": gateway(request).auth.enabled,
            "endpoints": [
                {
                    "method": method,
                    "path": route.path,
                    "auth": any(d.call is guarded for d in route.dependant.dependencies),
                    "summary": route.summary,
                }
                for route in api_routes(app)
                for method in sorted(route.methods or ())
                if route.include_in_schema
            ],
        },
    )


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    await gateway(request).load_effects()  # the schema describes each effect's parameters
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title}: API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )
