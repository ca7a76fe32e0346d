"""Dependency aliases for the routes: the settings, Redis, the registry and the job service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from worker.registry import Registry

from .jobs import Jobs
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_jobs(request: Request) -> Jobs:
    return Jobs(request.app.state.redis, request.app.state.settings)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
