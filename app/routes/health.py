"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from contract.schemas import Health

from .. import metrics
from ..deps import RedisDep, SettingsDep

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
            Health(status="not ready", redis=False, workers=None).model_dump(mode="json"), status_code=503
        )
    health = Health(status="ok" if workers else "not ready", redis=True, workers=workers)
    return JSONResponse(health.model_dump(mode="json"), status_code=200 if workers else 503)


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def prometheus(redis: RedisDep, settings: SettingsDep) -> Response:
    body, content_type = metrics.render(redis, settings)
    return Response(body, media_type=content_type)
