"""The FastAPI app: auth, errors as one line, health, readiness, metrics, the page, and the three APIs.

The app is a thin shell over the engine (DESIGN.md, "Contracts for the deployment layer"): it reads
requests, checks them against ``Limits``, hands them to the engine and shapes the answers.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sun_edge_server import api_a1111, api_native, api_openai
from sun_edge_server.engine import Engine
from sun_edge_server.limits import ApiError, Limits, one_line
from sun_edge_server.metrics import CountRequests, Metrics

log = logging.getLogger("sun_edge_server")
OPEN_PATHS = ("/healthz", "/")  # no key needed: liveness, and the static page (it asks for the key itself)
OPENAI_PREFIXES = ("/v1/images", "/v1/models")


@dataclass(frozen=True)
class AppConfig:
    api_key: str | None = None
    limits: Limits = Limits()
    timeout_s: float = 120.0  # queueing and generating, per request


@dataclass
class ServerState:
    engine: Engine
    config: AppConfig
    metrics: Metrics
    started: float = field(default_factory=time.time)
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options clients set (kept, mostly unused)

    @property
    def timeout_s(self) -> float:
        return self.config.timeout_s

    @property
    def limits(self) -> Limits:
        return self.config.limits


def error_body(path: str, status: int, message: str, field_name: str | None = None, kind: str | None = None) -> dict:
    """OpenAI's error shape on its routes (its client reads ``error.message``); ``detail`` elsewhere (FastAPI, A1111)."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    if path.startswith(OPENAI_PREFIXES):
        return {"error": {"message": message, "type": kind, "param": field_name, "code": status}}
    return {"detail": message, "error": kind, "field": field_name}


class RequireKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but ``OPEN_PATHS``, compared in constant time."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, ("Bearer " + key).encode() if key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.key is None or scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        message = ("missing Authorization header: send Authorization: Bearer <key>" if not given
                   else "wrong API key in the Authorization header")
        response = JSONResponse(error_body(scope.get("path", ""), 401, message, kind="authentication_error"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def create_app(engine: Engine, config: AppConfig = AppConfig()) -> FastAPI:
    app = FastAPI(title="sun-edge", docs_url=None, redoc_url=None, openapi_url=None)
    routers = (api_native.router, api_a1111.router, api_a1111.controlnet_router, api_openai.router)
    for router in routers:
        app.include_router(router)
    routes = {"/", "/healthz", "/readyz", "/metrics"} | {r.path for router in routers for r in router.routes}
    metrics = Metrics(routes)
    engine.observer = metrics
    app.state.sun = ServerState(engine, config, metrics)
    app.add_middleware(RequireKey, key=config.api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts the 401s too

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, e.status, e.message, e.field, e.kind), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, e.status_code, one_line(str(e.detail))),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(request.url.path, 500, "internal server error; see the server log"),
                            status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"alive": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if engine.ready and not engine.draining:
            return JSONResponse({"ready": True, "model": engine.source.name})
        reason = "draining" if engine.draining else ("failed: " + one_line(engine.failed)) if engine.failed else "loading"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth(engine.waiting())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("sun_edge_server").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
