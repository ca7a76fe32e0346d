"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from contract.problems import Forbidden
from contract.schemas import Health

from .. import metrics
from ..deps import RedisDep, SettingsDep

NOT_READY = {"Retry-After": "1"}  # every 503 says when to try again

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="liveness")
async def healthz() -> Health:
    """The process is up (touches no dependency)."""
    return Health(status="ok")


@router.get("/readyz", operation_id="readiness", response_model=Health, responses={503: {"model": Health}})
def readyz(redis: RedisDep, settings: SettingsDep) -> Response:
    """Ready: Redis answers and at least one worker has a live heartbeat."""
    try:
        redis.ping()
        workers = len(metrics.live_workers(redis, settings))
    except RedisError:
        return JSONResponse(
            Health(status="not ready", redis=False, workers=None).model_dump(mode="json"),
            status_code=503,
            headers=NOT_READY,
        )
    health = Health(status="ok" if workers else "not ready", redis=True, workers=workers)
    return JSONResponse(health.model_dump(mode="json"), status_code=200 if workers else 503,
                        headers=None if workers else NOT_READY)  # fmt: skip


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def prometheus(request: Request, redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus metrics (summed over the API processes); in production only with an `admin` key."""
    if settings.environment == "production":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        who = request.app.state.keys.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        if "admin" not in who.scopes:
            raise Forbidden("/metrics needs an API key with the 'admin' scope in production")
    body, content_type = metrics.render(redis, settings)
    return Response(body, media_type=content_type)
