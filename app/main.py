"""The API process: `create_app()` wires routers, the error handler, the Redis pool and metrics.

It never imports torch (a test checks): the maths runs in workers, reached through Redis.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

from contract.problems import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    UnsupportedMediaType,
)
from contract.registry import Registry, RegistryError
from contract.settings import PLACEHOLDER_SECRET, Settings

from . import metrics
from .auth import SECURITY_SCHEME, KeyStore
from .events import Events
from .indexes import Indexes
from .jobs import Jobs, Results
from .routes import admin, analyses, attributions, health, indexes, jobs, models

PROBLEM = "application/problem+json"


def connect(settings: Settings) -> Redis:
    """A pooled client that fails fast: no retries, short timeouts (Redis down -> 503 in ~1 s)."""
    timeout = settings.redis_timeout_s
    return Redis.from_url(
        settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def connect_async(settings: Settings) -> aioredis.Redis:
    """The event loop's client: the same, over a bounded pool in which a request waits (up to the
    timeout) for a free connection rather than failing when many arrive at once."""
    timeout = settings.redis_timeout_s
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
    )
    return aioredis.Redis(connection_pool=pool, retry=AsyncRetry(NoBackoff(), 0))


def refuse_placeholders(settings: Settings) -> None:
    """Outside development an API needs real keys and a real secret (or its job ids are guessable)."""
    if settings.environment == "development":
        return
    if settings.api_keys_file is None or settings.secret == PLACEHOLDER_SECRET:
        raise RuntimeError(
            "ATTR_ENVIRONMENT=production needs ATTR_API_KEYS_FILE (python -m app.keys) and ATTR_SECRET set"
        )
    if len(settings.secret.encode()) < 32:
        raise RuntimeError("ATTR_SECRET must be at least 32 bytes in production (e.g. python -c 'import secrets; "
                           "print(secrets.token_hex(32))')")  # fmt: skip


def problem(request: Request, exc: ServiceError) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "instance": request.url.path,
    }
    if exc.errors:
        body["errors"] = exc.errors
    return JSONResponse(body, status_code=exc.status, media_type=PROBLEM, headers=exc.headers)


def allowed(app: FastAPI, scope: dict) -> str:
    """The methods of the most specific routes on the request's path (fewest path parameters: POST
    /v1/analyses/leakage, not GET /v1/analyses/{id}), as the OpenAPI document lists them; HEAD, GET's
    twin, is not documented. (FastAPI wraps an included router: its routes are its `original_router`'s.)"""
    routes = [r for top in app.router.routes for r in getattr(getattr(top, "original_router", None), "routes", [top])]
    matched = []
    for route in (r for r in routes if isinstance(r, Route)):
        match, child = route.matches(scope)
        if match != Match.NONE:
            matched.append((len(child["path_params"]), route))
    fewest = min((n for n, _ in matched), default=0)
    return ", ".join(sorted({m for n, r in matched if n == fewest for m in r.methods or ()} - {"HEAD"}))


def _bad_json(exc: RequestValidationError, content_type: str | None) -> ServiceError | None:
    """A body that is not JSON (400, where it breaks) or not sent as JSON (415, the header to send)."""
    for e in exc.errors():
        if e["type"] == "json_invalid" and isinstance(exc.body, str | bytes):
            doc, at = exc.body if isinstance(exc.body, str) else exc.body.decode(errors="replace"), e["loc"][-1]
            line, column = doc.count("\n", 0, at) + 1, at - doc.rfind("\n", 0, at)
            return BadRequest(f"the body is not valid JSON: {e['ctx']['error']} at line {line}, column {column}")
        if tuple(e["loc"]) == ("body",) and "json" not in (content_type or "").lower():
            got = f"it says {content_type!r}" if content_type else "it has none"
            return UnsupportedMediaType(f"send the body as JSON with the header content-type: application/json ({got})")
    return None


def translate(exc: Exception, content_type: str | None = None) -> ServiceError:
    """Foreign exceptions -> the service's error tree (the one place this happens); `content_type`: the
    request's, which a body that is not an object is blamed on first."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RedisError):
        return Unavailable(f"the job store (Redis) is unavailable: {type(exc).__name__}; retry shortly", 1)
    if isinstance(exc, RequestValidationError) and (bad := _bad_json(exc, content_type)):
        return bad
    if isinstance(exc, RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        return InvalidInput(detail or "invalid request", errors)
    if isinstance(exc, HTTPException):  # routing: unknown path (404), wrong method (405, with Allow); a body
        error = ServiceError(str(exc.detail), headers=dict(exc.headers or {}))  # that is not JSON at all (400)
        error.status, error.title = exc.status_code, HTTPStatus(exc.status_code).phrase
        return error
    if isinstance(exc, RegistryError):
        return Unavailable(f"a registry entry cannot be served ({exc}); the operator must fix it", 60)
    return ServiceError("internal error; the request was not processed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    refuse_placeholders(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.redis, app.state.aredis = connect(settings), connect_async(settings)
        app.state.events = Events(settings, app.state.results)
        app.state.jobs = Jobs(app.state.redis, app.state.aredis, settings, app.state.events, app.state.results)
        app.state.indexes = Indexes(app.state.jobs)
        app.state.events.start()
        # Fewer, cheaper garbage collections: what start-up made is never collected again (freeze), and a
        # young generation of 50k objects instead of 700. Measured with bench.service, 2 API processes at
        # concurrency 32: cached GET p99 118 -> 58 ms, cache-hit POST p99 104 -> 57 ms.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        yield
        await app.state.events.stop()
        await app.state.jobs.webhooks.stop()
        await app.state.aredis.aclose()
        app.state.redis.close()

    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None}  # ATTR_DOCS=false
    app = (FastAPIOffline if settings.docs else FastAPI)(  # /docs and /redoc with the package's own assets
        **({} if settings.docs else hidden),
        title="Training-data attribution service",
        version="1.0.0",
        lifespan=lifespan,
        description="Which training examples made the model do this? Forward-INF attribution "
        "(arXiv 2402.08922): a mirrored step on the test points, one forward sweep "
        "over the training set.",
    )
    app.state.settings, app.state.registry = settings, Registry(settings.registry_dir)
    app.state.results = Results(settings.result_cache_bytes)
    app.state.keys = KeyStore(settings.api_keys_file, settings.local_tenant)
    routers = (attributions, analyses, jobs, indexes, models, admin, health)
    for router in (r.router for r in routers):
        app.include_router(router)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        error = translate(exc, request.headers.get("content-type"))
        if error.status == 405:  # Starlette's names only the first route on the path; others serve more
            error.headers["Allow"] = allowed(app, request.scope)
        return problem(request, error)

    for foreign in (ServiceError, RedisError, RequestValidationError, RegistryError, HTTPException):
        app.add_exception_handler(foreign, on_error)

    app.add_middleware(Guard, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    app.openapi = lambda: openapi(app)
    return app


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, plus the API-key scheme on every /v1 operation (the auth dependency reads
    the header itself: app/auth.py) where keys are asked for: not without a keys file (development's one
    local tenant), where Swagger's locks would say that a key is needed when none is."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        keyed = app.state.settings.api_keys_file is not None
        if keyed:
            spec.setdefault("components", {})["securitySchemes"] = {"apiKey": SECURITY_SCHEME}
        for path, operations in spec["paths"].items():
            for operation in operations.values() if keyed and path.startswith("/v1/") else ():
                operation["security"] = [{"apiKey": []}]
        app.openapi_schema = spec
    return app.openapi_schema


class Guard:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): refuses bodies over `limit` bytes (a file
    PUT to the registry: `upload_limit`), by Content-Length before reading or while streaming a chunked one
    (the app then sees a disconnect), and counts requests and latency per route for /metrics."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/admin/")
        limit = self.upload_limit if upload else self.limit
        start, received, too_large, status = time.perf_counter(), 0, False, 500
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            too_large = True
            await self._refuse(send, f"body of {int(length)} bytes exceeds the limit of {limit}")
            status = 413
        else:

            async def limited():
                nonlocal received, too_large
                if too_large:
                    return {"type": "http.disconnect"}
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
                return message

            async def guarded(message):
                nonlocal status
                if too_large:
                    return
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.app(scope, limited, guarded)
            except Exception:
                if not too_large:
                    raise
            if too_large:
                status = 413
                await self._refuse(send, f"body exceeds the limit of {limit} bytes")
        path = getattr(scope.get("route"), "path", "unmatched")
        metrics.REQUESTS.labels(scope["method"], path, str(status)).inc()
        metrics.LATENCY.labels(path).observe(time.perf_counter() - start)

    @staticmethod
    async def _refuse(send, detail: str) -> None:
        body = json.dumps(
            {"type": "about:blank", "title": PayloadTooLarge.title, "status": 413, "detail": detail}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
