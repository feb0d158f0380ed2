"""The OpenAI-compatible HTTP API of the daemon: ``create_app(settings) -> FastAPI``.

All state lives in the app (``app.state.services``: catalog, lifecycle, admission, metrics);
nothing at module level, so tests build as many apps as they like. The routes are in
``routes.py``; client mistakes become OpenAI-style errors via ``ApiError``; only bugs reach the
500 handler.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.serve.admission import Admission
from edgekit.serve.discovery import Catalog
from edgekit.serve.errors import ApiError
from edgekit.serve.guard import Guard, RequestMetrics, read_api_key
from edgekit.serve.lifecycle import Lifecycle
from edgekit.serve.metrics import ServeMetrics
from edgekit.serve.rerank import rerank
from edgekit.serve.routes import Services, api, probes
from edgekit.serve.settings import ServeSettings


def create_app(settings: ServeSettings) -> FastAPI:
    """The daemon as an ASGI app; models are discovered and preloaded by its lifespan."""
    logging.getLogger("edgekit").setLevel(settings.log_level.upper())
    api_key = read_api_key(settings)  # refuses a non-loopback bind without a key (docs/reliability.md case 9)
    metrics = ServeMetrics()
    catalog = Catalog(settings)
    lifecycle = Lifecycle(settings, catalog, metrics)
    services = Services(settings, metrics, catalog, lifecycle, Admission(settings, lifecycle, metrics))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.start_background()
        try:
            yield
        finally:
            await lifecycle.close()

    app = FastAPI(title="edgekit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services
    app.state.guard = Guard(settings, api_key)
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.allowed_origins:  # browsers need CORS headers (and preflight answers) to use an allowed origin's responses
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.include_router(api)
    app.include_router(rerank)
    app.include_router(probes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(settings.models), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        error = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))

    return app
