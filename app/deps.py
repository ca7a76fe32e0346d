"""Dependency aliases for the routes: the settings, Redis, the registry, the job and index services. Plain
`async def`: they do no I/O, so FastAPI calls them on the event loop instead of a thread."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from contract.registry import Registry
from contract.settings import Settings

from .indexes import Indexes
from .jobs import Jobs


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


async def get_indexes(request: Request) -> Indexes:
    return request.app.state.indexes


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
IndexesDep = Annotated[Indexes, Depends(get_indexes)]
