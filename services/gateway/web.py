"""The web page (static files, no build step) and API info at /."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from .core import Gateway

STATIC = Path(__file__).parent / "static"


def register(app: FastAPI, gw: Gateway, protected: list) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", tags=["info"], summary="The web page for browsers (Accept: text/html); API info as JSON otherwise",
             responses={200: {"content": {"text/html": {}, "application/json": {}}}})
    async def root(request: Request):
        # One URL, two representations: caches must key on Accept.
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Vary": "Accept"})
        guard = protected[0]
        return JSONResponse(headers={"Vary": "Accept"}, content={
            "name": "imagemesh", "version": app.version, "description": app.description,
            "docs": "/docs", "openapi": "/openapi.json", "auth_required": gw.auth.enabled,
            "endpoints": [{"method": method, "path": route.path, "auth": guard in route.dependencies,
                           "summary": route.summary}
                          for route in app.routes if isinstance(route, APIRoute)
                          for method in sorted(route.methods) if route.include_in_schema],
        })
