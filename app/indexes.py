"""Indexes from the API's side (contract/indexes.py): build one on the fleet (an IndexJob's parts and reduce,
enqueued like any computation), list, show and delete them, and find the one a request may use.

An index belongs to no tenant: an admin builds and deletes it, every reader sees it, and every request on
its model and dataset may use it. Its id is its build job's key, so rebuilding the same (model, dataset,
method, settings) joins the build or answers with the finished index; a changed model or dataset has
other digests, hence another id, and never finds an old index.
"""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool

from contract.indexes import IndexEntry
from contract.jobs import IndexJob
from contract.problems import NotFound

from .auth import Principal
from .jobs import ACTIVE, Jobs


def links(id: str) -> dict[str, str]:
    return {"self": f"/v1/indexes/{id}"}


class Indexes:
    def __init__(self, jobs: Jobs):
        self.jobs, self.settings, self.aredis = jobs, jobs.settings, jobs.aredis

    async def entries(self) -> list[IndexEntry]:
        """Every finished index."""
        ids = sorted(m.decode() for m in await self.aredis.smembers(IndexEntry.catalog(self.settings)))
        raw = await self.aredis.mget([IndexEntry.key(self.settings, i) for i in ids]) if ids else []
        return [IndexEntry.model_validate_json(r) for r in raw if r is not None]

    async def find(self, model_digest: str, dataset_digest: str) -> IndexEntry | None:
        """The newest finished index of exactly this model and dataset version."""
        found = [
            e for e in await self.entries() if (e.model.digest, e.dataset.digest) == (model_digest, dataset_digest)
        ]
        return max(found, key=lambda e: e.created, default=None)

    async def create(self, job: IndexJob, who: Principal, parts: list[tuple[int, int]]) -> tuple[dict, int]:
        """(The index's view, 200 when it is built already, else 202 with the build queued or joined)."""
        if (entry := await self._entry(job.key)) is not None:
            return self._finished(entry), 200
        await run_in_threadpool(self.jobs.start, job, who.tenant, parts)
        await self.aredis.sadd(IndexEntry.catalog(self.settings), job.key)
        names = {"model": job.model.id, "dataset": job.dataset.id}
        name = self.settings.key("index-request", job.key)
        async with self.aredis.pipeline(transaction=True) as pipe:
            await pipe.hset(name, mapping=names).expire(name, self.settings.job_record_ttl_s).execute()
        return await self.view(job.key), 202

    async def view(self, id: str) -> dict:
        if (entry := await self._entry(id)) is not None:
            return self._finished(entry)
        names = await self.aredis.hgetall(self.settings.key("index-request", id))
        state = await run_in_threadpool(self.jobs.state, id) if names else None
        if state is not None and state["status"] == "finished":  # it finished since the entry was read
            if (entry := await self._entry(id)) is not None:
                return self._finished(entry)
            state = None  # deleted meanwhile
        if state is None:
            raise NotFound(f"no index {id!r} (unknown, deleted, or its build's record expired)")
        names = {k.decode(): v.decode() for k, v in names.items()}
        return {"id": id, **names, **{k: state[k] for k in ("status", "progress", "error")}, "links": links(id)}

    async def page(self) -> dict:
        ids = sorted(m.decode() for m in await self.aredis.smembers(IndexEntry.catalog(self.settings)))
        items = []
        for id in ids:
            try:
                items.append(await self.view(id))
            except NotFound:  # a build whose record expired: forget it
                await self.aredis.srem(IndexEntry.catalog(self.settings), id)
        return {"items": items}

    async def delete(self, id: str) -> None:
        """Stop a build and forget the index; the workers' maintenance then frees its files (Store.
        free_indexes: the shard files no other index of its basis uses, the basis folder when none does)."""
        view = await self.view(id)
        if view["status"] in ACTIVE:
            await run_in_threadpool(self.jobs.stop, id)
        entry = await self._entry(id)
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.srem(IndexEntry.catalog(self.settings), id).delete(IndexEntry.key(self.settings, id))
            pipe.delete(self.settings.key("index-request", id))
            if entry is not None:
                pipe.zadd(IndexEntry.orphans(self.settings), {entry.basis: time.time()})
            await pipe.execute()

    async def _entry(self, id: str) -> IndexEntry | None:
        raw = await self.aredis.get(IndexEntry.key(self.settings, id))
        return None if raw is None else IndexEntry.model_validate_json(raw)

    def _finished(self, entry: IndexEntry) -> dict:
        return {"id": entry.id, "status": "finished", "model": entry.model.id, "dataset": entry.dataset.id,
                "progress": {}, "error": None, "index": entry.model_dump(mode="json"), "links": links(entry.id)}  # fmt: skip
