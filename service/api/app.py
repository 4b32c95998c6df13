"""The FastAPI application factory: routes, auth, and the error mapping that keeps every answer in the contract's
`{"error": {"type", "message", "param"}}` shape, whatever the client sends."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import core
from core import logs
from core.errors import BrokerUnavailable, MergelineError, RateLimited, RequestTooLarge
from core.spec import JobSpec
from service.api.deps import Services
from service.api.routes import jobs, lineages, ops
from service.ui import router as ui_router

log = logging.getLogger("mergeline.api")


def error_response(status: int, type: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "message": message, "param": param}}, status_code=status,
                        headers=headers)


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length up front, and by counting for chunked bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(413 if length.isdigit() else 400,
                                      "request_too_large" if length.isdigit() else "invalid_request",
                                      f"request bodies are limited to {self.max_bytes} bytes"
                                      if length.isdigit() else "bad Content-Length header")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge(f"request bodies are limited to {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class ServerTiming:
    """`Server-Timing: app;dur=<ms>` on every answer: the API's own time up to the response head, so that load
    figures can tell it apart from the network and the client (bench/service_load.py)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                duration = f"app;dur={(time.perf_counter() - started) * 1000:.3f}".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", duration)]}
            await send(message)

        await self.app(scope, receive, timed)


def _validation_param(loc: tuple | list) -> tuple[str, str | None]:
    """(where, param) from a FastAPI error location such as ("query", "limit") or ("header", "idempotency-key")."""
    where = str(loc[0]) if loc else "body"
    rest = [str(p) for p in loc[1:]]
    return where, ".".join(rest) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MergelineError)
    async def mergeline_error(_: Request, exc: MergelineError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after)}
        if exc.status_code >= 500 and not isinstance(exc, BrokerUnavailable):
            log.warning("request failed", extra={"type": exc.type, "reason": exc.message})
        return error_response(exc.status_code, exc.type, exc.message, exc.param, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where, param = _validation_param(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if where == "path":  # a path that cannot name anything (a version that is not a number) names nothing
            return error_response(404, "not_found", message, param)
        return error_response(422 if where == "body" else 400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: ("not_found", "no such route"), 405: ("method_not_allowed", "method not allowed on this route")}
        type, message = kinds.get(exc.status_code, ("invalid_request", str(exc.detail)))
        return error_response(exc.status_code, type, message, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in a request")
        return error_response(500, "internal", "internal error; see the service log")


def create_app(services: Services) -> FastAPI:
    """The API over `services` (built by the entry point: `uvicorn --factory mergeline.compose:api_app`)."""
    settings = services.settings
    logs.configure(settings.log_level)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # Everything built at start-up (routes, models, settings) is left out of the collector's scans: full
        # collections over it set the status poll's p99 (bench.service_load, docs/benchmarks.md).
        gc.freeze()
        yield
        await services.reads.aclose()

    app = FastAPI(title="Mergeline", version=core.__version__, lifespan=lifespan,
                  description="Continual model merging as a service: submit merge jobs, follow them, read lineages.")
    app.state.services = services
    for router in (jobs.router, lineages.router, ops.router):
        app.include_router(router)
    app.include_router(ui_router, include_in_schema=False)  # the dashboard at /ui: pages only, not in the schema
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ServerTiming)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the JobSpec model (the submit route reads its body itself to map errors exactly)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(spec_schema.pop("$defs", {}))
    components["JobSpec"] = spec_schema
    app.openapi_schema = schema
    return schema
