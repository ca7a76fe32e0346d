"""Jobs from the API's side (attributions and analyses): tenant handles, cache lookup, dedup, quotas,
enqueue, views, long polls, cancel and delete, the job list.

    computation K   the resolved payload's identity (contract/jobs.py: `Job.key`): identical requests, of
                    any tenant, share one computation and one stored result
    handle H        HMAC(secret, tenant, K): the job id a tenant sees, unguessable, different per tenant
    fi:handle:H     {tenant, key, kind, model, dataset, method, top_k, created[, canceled]}
    fi:holders:K    the handles that still want K: when the last one lets go, a queued or running K stops
                    and a finished K's result and scores are deleted
    fi:jobs:T       tenant T's handles by creation time (GET /v1/jobs)
    fi:admitted:T   computations T started that may still be queued or running, by admission time (its cap)
    fi:admitted-cost:T   their estimated worker-seconds (its budget; admission by cost: contract/cost.py)

A computation is one RQ job (id K) when its training set is one part (DatasetManifest.parts), else a
fan-out: one shard job per part (id `part_id(K, first shard)`, on that part's affinity queue) and a reduce
job (id K, on the main queue) that depends on them all and may run after a failed one (it then fails
with the part's reason). K's meta lists its parts; their progress is summed from `fi:progress:K`; a
cancel stops every part that runs and cancels the rest.

A tenant sees only its own handles (another tenant's is a 404) and `cached: true` only for what it asked
itself before: a first request for a result another tenant already has is a 202 whose view is finished.
What stays observable is timing: a shared computation finishes sooner, or shows progress at once.

States are RQ's own: FAILED (with the worker's one-line reason, no traceback), STOPPED (a running job
canceled), CANCELED (a queued one). Only a job whose worker died is retried; one that raised is not.
The hot path (a finished job's view, a cache-hit POST, long polls) runs on the event loop with the
async Redis client; RQ's own calls (enqueue, a queued or running job's state, stop) run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from pydantic import ValidationError
from redis import Redis
from redis import asyncio as aioredis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Dependency, JobStatus, Retry
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from contract.cost import cheaper, cost_key, method_id, work
from contract.jobs import HANDLE_LENGTH, PROBE_FUNC, affinity_queue, bucket_of, part_id, queue_names
from contract.kinds import AnalysisPublic, Job, JobSummary
from contract.method import Family, family_of
from contract.problems import Conflict, InvalidInput, NotFound, TooManyRequests, Unavailable
from contract.results import STORED, PartProgress, Stored, StoredAttribution, channel, result_key
from contract.schemas import AttributionPublic, AttributionResult, Webhook
from contract.scores import block_key
from contract.settings import Settings

from .auth import Principal
from .events import Events
from .scores import Scores
from .webhooks import Webhooks

STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued",
    JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}
ACTIVE = ("queued", "running")
# a tenant's active computations (KEYS[1], a sorted set by admission time ARGV[3]; KEYS[2], their estimated
# worker-seconds) take ARGV[1], estimated at ARGV[4], below the cap ARGV[2] and within the budget ARGV[5]:
# 2 added, 1 there already, 0 refused by the cap, -1 by the budget
ADMIT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
local spent = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do spent = spent + tonumber(v) end
if tonumber(ARGV[4]) > 0 and spent + tonumber(ARGV[4]) > tonumber(ARGV[5]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
return 2
"""
ADMITTED = 2
ENQUEUE_GRACE_S = 60  # an admitted computation without an RQ job this long after is gone (expired), not starting
View = AttributionPublic | AnalysisPublic  # a job's public view
LARGE = 1 << 16  # stored results larger than this are parsed in a thread, not on the event loop


def queued(redis: Redis, settings: Settings) -> int:
    """Jobs waiting in every queue."""
    names = queue_names(settings.queue, settings.affinity_buckets)
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(Queue(name, connection=redis).key)
        return sum(pipe.execute())


def links(kind: str, handle: str) -> dict[str, str]:
    base = f"/v1/{'attributions' if family_of(kind) == 'attribution' else 'analyses'}/{handle}"
    return {"self": base, "scores": f"{base}/scores", "report": f"{base}/report", "export": f"{base}/export"}


def parse(raw: bytes) -> Stored:
    """A stored result from its JSON, with the cyclic garbage collector paused: a large result is hundreds
    of thousands of small objects, whose allocation otherwise sets off collections that cost three times
    the parse (measured: 200,000 proponents, 560 ms with them, 156 ms without; json.loads alone 124 ms)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return STORED.validate_json(raw)
    finally:
        if enabled:
            gc.enable()


class Results:
    """Finished results, parsed once per API process, and their encoded views. A result never changes
    under its key (the key hashes everything it depends on), so a popular one (a report, repeated views,
    the long polls one job's end wakes) is read and parsed once, and a hit costs no Redis command: an
    entry lives until the result's own expiry in Redis (read with it), and a deleted result is dropped
    from every API process by its `drop` event (app/events.py). Bounded by the stored JSON's size
    (`result_cache_bytes`)."""

    def __init__(self, budget_bytes: int):
        self.budget, self.bytes = budget_bytes, 0
        self.items: OrderedDict[str, tuple[Stored, int, float]] = OrderedDict()  # name -> (result, size, expires)
        self.encoded: OrderedDict[tuple, bytes] = OrderedDict()
        self.loading: dict[str, asyncio.Lock] = {}  # one reader per result: concurrent misses wait for it

    async def get(self, aredis: aioredis.Redis, name: str) -> Stored | None:
        if (hit := self._hit(name)) is not None:
            return hit
        async with self.loading.setdefault(name, asyncio.Lock()):
            if (hit := self._hit(name)) is not None:  # another request read it meanwhile
                return hit
            async with aredis.pipeline(transaction=False) as pipe:
                raw, ttl_ms = await pipe.get(name).pttl(name).execute()
            self.loading.pop(name, None)
            if raw is None:
                return None
            try:
                result = await run_in_threadpool(parse, raw) if len(raw) > LARGE else parse(raw)
            except ValidationError:  # stored by an earlier release: unknown here
                return None
            expires = time.monotonic() + (ttl_ms / 1000 if ttl_ms > 0 else 60.0)
            self.items[name], self.bytes = (result, len(raw), expires), self.bytes + len(raw)
            while self.bytes > self.budget and len(self.items) > 1:
                self.drop(next(iter(self.items)))
            return result

    def _hit(self, name: str) -> Stored | None:
        entry = self.items.get(name)
        if entry is None:
            return None
        if time.monotonic() >= entry[2]:  # expired in Redis too by now
            self.drop(name)
            return None
        self.items.move_to_end(name)
        return entry[0]

    def view(self, name: str, variant: tuple, encode: Callable[[], bytes]) -> bytes:
        """The encoded view `variant` of the cached result `name` (call after get() found it)."""
        key = (name, *variant)
        if key not in self.encoded:
            self.encoded[key] = body = encode()
            self.bytes += len(body)
            while self.bytes > self.budget and len(self.encoded) > 1:
                self.bytes -= len(self.encoded.popitem(last=False)[1])
        return self.encoded[key]

    def drop(self, name: str) -> None:
        if name in self.items:
            self.bytes -= self.items.pop(name)[1]
        for key in [k for k in self.encoded if k[0] == name]:
            self.bytes -= len(self.encoded.pop(key))


class Jobs:
    def __init__(self, redis: Redis, aredis: aioredis.Redis, settings: Settings, events: Events, results: Results):
        self.redis, self.aredis, self.settings, self.events, self.results = redis, aredis, settings, events, results
        self.queue = Queue(settings.queue, connection=redis, serializer=JSONSerializer)
        self.queues = {settings.queue: self.queue}
        self.key = settings.key
        self.webhooks = Webhooks(settings, aredis, self.hooked)
        events.listen(self.webhooks.ended)

    def handle_of(self, tenant: str, key: str) -> str:
        mac = hmac.new(self.settings.secret.encode(), f"{tenant}\0{key}".encode(), hashlib.sha256)
        return mac.hexdigest()[:HANDLE_LENGTH]

    # -- submit -----------------------------------------------------------------------------------
    async def submit(
        self,
        job: Job,
        who: Principal,
        top_k: int | None = None,
        parts: list[tuple[int, int]] | None = None,
        records: int = 0,
    ) -> tuple[bytes, int, str]:
        """The job's view for this tenant (JSON), its status code and its handle: 200 when the tenant asked
        the same before and it has finished (`cached`), else 202 (new, joined, or finished for another).
        `parts`: the training set's parts (shard ranges); more than one fans the computation out. `records`:
        the training set's size, which prices the work (contract/cost.py)."""
        key = job.key
        handle = self.handle_of(who.tenant, key)
        raw = await self.aredis.hgetall(self.key("handle", handle))
        record = {k.decode(): v.decode() for k, v in raw.items()}
        known = bool(record) and not record.get("canceled")  # asked before and did not let go (else others kept it)
        result = await self.results.get(self.aredis, result_key(self.settings, key))
        if result is None:  # work to do: counted against the tenant's rate (an answer from the cache is not)
            estimate = await self.estimate(job, records)
            await self._rate(who.tenant)
            await run_in_threadpool(self.start, job, who.tenant, parts or [(0, 1)], estimate)
        if not known:
            record = await self._hold(handle, who.tenant, job, top_k)
        if result is None:
            return _encode(await self._view(handle, record, top_k)), 202, handle
        name, k = result_key(self.settings, key), top_k or int(record["top_k"])
        body = self.results.view(name, (handle, k, known), lambda: _encode(self._finished(handle, result, k, known)))
        return body, 200 if known else 202, handle

    async def estimate(self, job: Job, records: int) -> float | None:
        """The request's work in worker-seconds (contract/cost.py), None where its model was never measured;
        refused (422) past the job time limit, with what makes it cheaper."""
        units = work(job, records)
        rates = await self.aredis.hgetall(cost_key(self.settings, job.model, job.dtype)) if units else {}
        if not rates:
            return None
        rate = rates.get(method_id(job.method).encode()) or max(rates.values(), key=float)  # contract/cost.py
        seconds, limit = float(rate) * units, self.settings.job_timeout_s
        if seconds > limit:
            raise InvalidInput(
                f"this request would take about {seconds:,.0f} worker-seconds ({units:,} record-rows at "
                f"{float(rate) * 1e6:.3g} µs each, as measured on this model), past the job time limit of "
                f"{limit:,} s (ATTR_JOB_TIMEOUT_S): {cheaper(job)}"
            )
        return seconds

    async def _rate(self, tenant: str) -> None:
        """One more submission of work by `tenant` this minute: refused past ATTR_SUBMIT_RATE_PER_MINUTE."""
        window = self.key("rate", tenant, str(int(time.time() // 60)))
        async with self.aredis.pipeline(transaction=False) as pipe:
            count, _ = await pipe.incr(window).expire(window, 120).execute()
        if count > self.settings.submit_rate_per_minute:
            raise TooManyRequests(
                f"this tenant has submitted {self.settings.submit_rate_per_minute} requests for new work this minute "
                "(ATTR_SUBMIT_RATE_PER_MINUTE; answers from the cache are not counted)",
                60 - int(time.time()) % 60,
            )

    def start(self, job: Job, tenant: str, parts: list[tuple[int, int]], estimate: float | None = None) -> None:
        """Enqueue the computation unless an identical one is queued or running (then it is joined): one job
        (the payload's `functions`), or one per part and a reduce where it has parts and is split; on the
        long queues where `estimate` (worker-seconds) passes long_job_s."""
        key = job.key
        if job.functions[1] is None:  # a payload that runs as one job only (two-stage attribution)
            parts = [(0, 1)]
        existing = self._fetch(key)
        if existing is not None and STATUS.get(existing.get_status(refresh=False)) in ACTIVE:
            return
        admitted = self._admit(tenant, key, estimate)
        try:
            self._enqueue(job, parts, existing, estimate)
        except BaseException:
            if admitted == ADMITTED:
                self.redis.zrem(self.key("admitted", tenant), key)
                self.redis.hdel(self.key("admitted-cost", tenant), key)
            raise

    def _enqueue(self, job: Job, parts: list[tuple[int, int]], existing: RQJob | None, estimate: float | None) -> None:
        key = job.key
        long = estimate is not None and estimate > self.settings.long_job_s
        admission = {"estimate_s": float(f"{estimate:.3g}"), "long": long} if estimate is not None else None
        whole, part_func, reduce_func = job.functions
        if existing is not None:  # a new try of something that failed, was canceled, or whose result expired
            for part in existing.meta.get("parts", []):
                with contextlib.suppress(NoSuchJobError):
                    RQJob.fetch(part, connection=self.redis, serializer=JSONSerializer).delete()
            existing.delete()
        payload = job.model_dump(mode="json")
        s, retries = self.settings, self.settings.job_retries
        common = {
            "job_timeout": s.job_timeout_s,
            "result_ttl": s.job_record_ttl_s,
            "failure_ttl": s.job_record_ttl_s,
            "ttl": s.job_record_ttl_s,
            "retry": Retry(max=retries) if retries else None,  # spent only on abandoned runs (worker/__main__.py)
        }
        try:
            if len(parts) == 1:  # on the affinity queue of the training set's first part, like a shard job
                bucket = bucket_of(job.dataset.digest, 0, s.affinity_buckets)
                queue = self._queue(affinity_queue(s.queue, bucket, long))
                meta = {"kind": job.kind, "admission": admission}
                queue.enqueue(whole, payload, job_id=key, unique=True, meta=meta, **common)
            elif self.redis.set(self.key("starting", key), "1", nx=True, ex=60):  # one API process fans out
                try:
                    ids = [part_id(key, first) for first, _ in parts]
                    for (first, stop), id in zip(parts, ids, strict=True):
                        bucket = bucket_of(job.dataset.digest, first, s.affinity_buckets)
                        queue = self._queue(affinity_queue(s.queue, bucket, long))
                        queue.enqueue(
                            part_func, payload, first, stop, job_id=id, unique=True, meta={"kind": "part"}, **common
                        )
                    after = Dependency(jobs=ids, allow_failure=True)  # runs to report a failed part too
                    meta = {"kind": job.kind, "parts": ids, "admission": admission}
                    self.redis.delete(PartProgress.key(self.settings, key))
                    self.queue.enqueue(reduce_func, payload, job_id=key, depends_on=after, meta=meta, **common)
                finally:
                    self.redis.delete(self.key("starting", key))
            else:
                return  # another API process is enqueueing it: joined
        except DuplicateJobError:  # an identical request got there first: join it
            return

    async def probe(self, model_id: str) -> dict:
        """Registration's dry run on a worker (PROBE_FUNC): its answer, or the reason it failed (422), or
        503 when no worker answers within ATTR_PROBE_TIMEOUT_S."""
        s = self.settings
        job = await run_in_threadpool(
            self.queue.enqueue, PROBE_FUNC, {"id": model_id}, job_timeout=s.probe_timeout_s, result_ttl=60,
            failure_ttl=60, ttl=s.probe_timeout_s,
        )  # fmt: skip
        deadline = time.monotonic() + s.probe_timeout_s
        while time.monotonic() < deadline:
            status = await run_in_threadpool(job.get_status)
            if status == JobStatus.FINISHED:
                return await run_in_threadpool(job.return_value)
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                await run_in_threadpool(job.refresh)
                raise InvalidInput(f"model {model_id!r} does not run on a worker: {job.meta.get('error', status)}")
            await asyncio.sleep(0.2)
        await run_in_threadpool(job.cancel)
        raise Unavailable(f"no worker tried model {model_id!r} within {s.probe_timeout_s} s", s.retry_after_s)

    def _queue(self, name: str) -> Queue:
        if name not in self.queues:
            self.queues[name] = Queue(name, connection=self.redis, serializer=JSONSerializer)
        return self.queues[name]

    def _admit(self, tenant: str, key: str, estimate: float | None = None) -> int:
        """Count computation `key` among the tenant's queued or running ones, or refuse it (429) at the cap
        or past the tenant's budget of estimated worker-seconds: one atomic check-and-add in Redis (ADMIT),
        so concurrent requests never pass either together (a count, then an add, let 34 of 300 concurrent
        POSTs in against a cap of 16). Ended computations are dropped from the count first, and one
        admitted but not enqueued only after ENQUEUE_GRACE_S (another request's admission, still being
        enqueued). Returns ADMITTED where this call added it."""
        s = self.settings
        if (waiting := queued(self.redis, s)) >= s.max_queued_jobs:
            raise Unavailable(f"the queue is full ({waiting} jobs waiting; ATTR_MAX_QUEUED_JOBS)", s.retry_after_s)
        name, now = self.key("admitted", tenant), time.time()
        ended = []
        for member, admitted_at in self.redis.zrange(name, 0, -1, withscores=True):
            state = self._state(member.decode())  # None: not enqueued yet (admitted a moment ago), or expired
            if state not in ACTIVE and (state is not None or now - admitted_at > ENQUEUE_GRACE_S):
                ended.append(member)
        costs = self.key("admitted-cost", tenant)
        if ended:
            self.redis.zrem(name, *ended)
            self.redis.hdel(costs, *ended)
        admitted = self.redis.eval(ADMIT, 2, name, costs, key, s.max_active_jobs_per_tenant, now, estimate or 0,
                                   s.tenant_budget_s)  # fmt: skip
        if admitted == -1:
            spent = sum(float(v) for v in self.redis.hvals(costs))
            raise TooManyRequests(
                f"this tenant's queued and running work is estimated at {spent:,.0f} worker-seconds; this request's "
                f"{estimate:,.0f} more would pass its budget of {s.tenant_budget_s:,.0f} (ATTR_TENANT_BUDGET_S): "
                "wait for some of it to end",
                s.retry_after_s,
            )
        if not admitted:
            raise TooManyRequests(
                f"{s.max_active_jobs_per_tenant} of this tenant's jobs are queued or running "
                "(ATTR_MAX_ACTIVE_JOBS_PER_TENANT); wait for one to end",
                s.retry_after_s,
            )
        return admitted

    async def _hold(self, handle: str, tenant: str, job: Job, top_k: int | None) -> dict[str, str]:
        """The tenant's handle on computation `job.key`: created (or renewed, and un-canceled)."""
        name, holders, ttl = self.key("handle", handle), self.key("holders", job.key), self.settings.score_ttl_s
        record = {
            "tenant": tenant,
            "key": job.key,
            "kind": job.kind,
            "model": job.model.id,
            "dataset": job.dataset.id,
            "method": job.method.model_dump_json(),
        }
        now = time.time()
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.hset(name, mapping=record).hsetnx(name, "created", str(now)).hsetnx(name, "top_k", str(top_k or 10))
            pipe.hdel(name, "canceled").expire(name, ttl).sadd(holders, handle).expire(holders, ttl)
            pipe.zadd(self.key("jobs", tenant), {handle: now}, nx=True).hmget(name, "created", "top_k")
            *_, (created, kept_top_k) = await pipe.execute()
        return {**record, "created": created.decode(), "top_k": kept_top_k.decode()}

    # -- views ------------------------------------------------------------------------------------
    async def hooked(self, handle: str) -> tuple[Webhook, str, bytes] | None:
        """The handle's webhook, its job's status and encoded view; None without a webhook (app/webhooks.py)."""
        record = await self._lookup(handle)
        if not record.get("webhook"):
            return None
        return Webhook.model_validate_json(record["webhook"]), *await self._look(handle, record, None)

    async def _lookup(self, handle: str) -> dict[str, str]:
        raw = await self.aredis.hgetall(self.key("handle", handle))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def _record(self, handle: str, tenant: str, family: Family | None = None) -> dict[str, str]:
        """The tenant's handle record; 404 for an unknown handle, another tenant's, or the other family's
        (an attribution id asked for as an analysis, or the reverse)."""
        record = await self._lookup(handle)
        if not record or record["tenant"] != tenant or family not in (None, family_of(record["kind"])):
            raise NotFound(f"no {family or 'job'} {handle!r} (unknown, or expired)")
        return record

    async def view(self, handle: str, who: Principal, top_k: int | None, family: Family) -> View:
        return await self._view(handle, await self._record(handle, who.tenant, family), top_k)

    async def _view(self, handle: str, record: dict[str, str], top_k: int | None) -> View:
        k, name = top_k or int(record["top_k"]), result_key(self.settings, record["key"])
        if not record.get("canceled") and (result := await self.results.get(self.aredis, name)) is not None:
            return self._finished(handle, result, k)
        view = await run_in_threadpool(self._active, handle, record)
        # finished between the two reads: a worker stores the result before RQ records the end, so it is there now
        if view.status == "finished" and (result := await self.results.get(self.aredis, name)) is not None:
            return self._finished(handle, result, k)
        return view

    async def _look(self, handle: str, record: dict[str, str], top_k: int | None) -> tuple[str, bytes]:
        """(status, the encoded view): a finished view is encoded once per handle and top_k."""
        k = top_k or int(record["top_k"])
        name = result_key(self.settings, record["key"])
        if not record.get("canceled") and (result := await self.results.get(self.aredis, name)) is not None:
            return "finished", self.results.view(
                name, (handle, k, False), lambda: _encode(self._finished(handle, result, k))
            )
        view = await self._view(handle, record, top_k)
        return view.status, _encode(view)

    async def wait(self, handle: str, who: Principal, top_k: int | None, wait_s: float, family: Family) -> bytes:
        """The view (as JSON) once the job has ended or `wait_s` has passed: a long poll that holds no
        thread and polls nothing (the job's end, published by its worker, wakes it)."""
        async with contextlib.aclosing(self.follow(handle, who, family, top_k, time.monotonic() + wait_s)) as views:
            async for _, view in views:
                last = view
        return last

    async def follow(
        self,
        handle: str,
        who: Principal,
        family: Family,
        top_k: int | None = None,
        deadline: float = math.inf,
        every: float | None = None,
    ) -> AsyncIterator[tuple[str, bytes]]:
        """The job's view (JSON) as ("progress", view) each time it changes, read when the job ends and,
        with `every`, every so many seconds; ("keepalive", b"") after ATTR_EVENTS_KEEPALIVE_S without a
        change; last ("end", view) once it has ended, or ("timeout", view) at `deadline` (monotonic)."""
        record = await self._record(handle, who.tenant, family)
        last, said = None, time.monotonic()
        with self.events.watch(record["key"]) as ended:
            while True:
                ended.clear()  # before the read: an end published during it still wakes the wait below
                status, body = await self._look(handle, record, top_k)
                now = time.monotonic()
                if status not in ACTIVE or now >= deadline:
                    yield ("end" if status not in ACTIVE else "timeout"), body
                    return
                if body != last or now - said >= self.settings.events_keepalive_s:
                    yield ("progress", body) if body != last else ("keepalive", b"")
                    last, said = body, now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), min(deadline - now, every or math.inf))
                record = await self._record(handle, who.tenant, family)  # a cancel may have changed it

    async def finished(self, handle: str, who: Principal, family: Family) -> tuple[Stored, Scores, int]:
        """The stored result of a finished job, a reader of its scores and the top_k the tenant asked for;
        409 when it has not finished."""
        record = await self._record(handle, who.tenant, family)
        name = result_key(self.settings, record["key"])
        result = None if record.get("canceled") else await self.results.get(self.aredis, name)
        if result is None:
            view = await self._view(handle, record, None)
            raise Conflict(f"{handle!r} is {view.status}: no result")
        return result, Scores(self.aredis, self.settings, record["key"], result), int(record["top_k"])

    # -- cancel and delete --------------------------------------------------------------------------
    async def cancel(self, handle: str, who: Principal, family: Family) -> View | None:
        """A queued or running job: the tenant lets go of it (202 and its view, now canceled); the
        computation stops only when no tenant holds it any more. An ended job (finished, failed,
        canceled): its handle is deleted (None: 204), and a finished result nobody else holds with it."""
        record = await self._record(handle, who.tenant, family)
        key, status = record["key"], (await self._view(handle, record, None)).status
        holders = self.key("holders", key)
        if status in ACTIVE:
            async with self.aredis.pipeline(transaction=True) as pipe:
                await pipe.hset(self.key("handle", handle), "canceled", "1").srem(holders, handle).execute()
            if not await self.aredis.scard(holders):
                await run_in_threadpool(self.stop, key)
            await self.aredis.publish(channel(self.settings), key)  # waiting long polls read their view again
            return await self._view(handle, {**record, "canceled": "1"}, None)
        async with self.aredis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key("handle", handle)).srem(holders, handle).zrem(self.key("jobs", who.tenant), handle)
            await pipe.execute()
        if status == "finished" and not await self.aredis.scard(holders):  # score files: the workers' cleanup
            name = result_key(self.settings, key)
            result = await self.results.get(self.aredis, name)
            blocks = [block_key(self.settings, key, b.lo) for b in result.blocks if b.at == "redis"] if result else []
            await self.aredis.delete(name, *blocks, holders)
            await self.aredis.publish(channel(self.settings), f"drop:{name}")  # every API's cache
        return None

    def stop(self, key: str) -> None:
        """Stop computation `key`: every part (or the one job) that runs, at its next batch; cancel what waits."""
        job = self._fetch(key)
        if job is None:
            return
        for id in [*job.meta.get("parts", []), key]:
            part = job if id == key else self._fetch(id)
            status = part.get_status(refresh=id != key) if part is not None else None
            with contextlib.suppress(InvalidJobOperation):  # it ended meanwhile
                if status == JobStatus.STARTED:
                    send_stop_job_command(self.redis, id, serializer=JSONSerializer)
                elif STATUS.get(status) == "queued":
                    part.cancel()
        self.redis.publish(channel(self.settings), key)

    # -- the job list ---------------------------------------------------------------------------------
    async def page(self, who: Principal, limit: int, before: float | None, kind: str | None, status: str | None):
        """The tenant's jobs newest first, filtered; `next` continues after the last one returned."""
        name, items, cursor = self.key("jobs", who.tenant), [], before
        while len(items) < limit:
            top = "+inf" if cursor is None else f"({cursor!r}"
            chunk = await self.aredis.zrevrangebyscore(name, top, "-inf", start=0, num=limit, withscores=True)
            if not chunk:
                return {"items": items, "next": None}
            for raw, created in chunk:
                cursor, handle = created, raw.decode()
                try:
                    record = await self._record(handle, who.tenant)
                except NotFound:
                    await self.aredis.zrem(name, handle)  # expired
                    continue
                if kind is not None and record["kind"] != kind:
                    continue
                view = await self._view(handle, record, 1)
                if status is None or view.status == status:
                    when = datetime.fromtimestamp(float(record["created"]), UTC)
                    summary = view.model_dump(include={"id", "status", "model", "dataset", "links"})
                    items.append(JobSummary(**summary, kind=record["kind"], created=when).model_dump(mode="json"))
                    if len(items) == limit:
                        break
        return {"items": items, "next": repr(cursor)}

    # -- RQ's side (in threads) -------------------------------------------------------------------------
    def _fetch(self, key: str) -> RQJob | None:
        try:
            job = RQJob.fetch(key, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        return job if job.args and "engine_version" in job.args[0] else None  # else enqueued by an earlier release

    def _state(self, key: str) -> str | None:
        if self.redis.exists(result_key(self.settings, key)):
            return "finished"
        job = self._fetch(key)
        return STATUS.get(job.get_status(refresh=False), "queued") if job is not None else None

    def state(self, key: str) -> dict | None:
        """RQ's state of computation `key` as a view's fields (status, progress, timing, error), or None where
        RQ has no record of it (never enqueued, or expired)."""
        job = self._fetch(key)
        if job is None:
            return None
        status, meta = STATUS.get(job.get_status(refresh=False), "queued"), job.meta
        if meta.get("parts") and status == "queued":  # a fan-out: the reduce waits while its parts run
            meta = {**meta, "progress": self._fanout_progress(key, len(meta["parts"]))}
            status = "running" if meta["progress"]["done"] or meta["progress"]["total"] else "queued"
        error = failure(job) if status == "failed" else None
        return {"status": status, "progress": meta.get("progress", {}), "timing": meta.get("timing"), "error": error,
                "admission": meta.get("admission")}  # fmt: skip

    def _active(self, handle: str, record: dict[str, str]) -> View:
        """The view of a job without a result: canceled by this tenant, or RQ's state of the computation."""
        state = None if record.get("canceled") else self.state(record["key"])
        if state is None and not record.get("canceled"):
            raise NotFound(f"{handle!r}: its job record expired; submit the request again")
        state = state or {"status": "canceled", "progress": {}, "timing": None, "error": None}
        kind = record["kind"]
        common = {
            "id": handle,
            "model": record["model"],
            "dataset": record["dataset"],
            "method": json.loads(record["method"]),
            "links": links(kind, handle),
            **state,
        }
        return AttributionPublic(**common) if family_of(kind) == "attribution" else AnalysisPublic(kind=kind, **common)

    def _fanout_progress(self, key: str, parts: int) -> dict:
        """The parts' progress summed (total known once every part has started; ETA of the slowest)."""
        seen = [PartProgress.model_validate_json(v) for v in self.redis.hvals(PartProgress.key(self.settings, key))]
        total = sum(p.total or 0 for p in seen) if len(seen) == parts and all(p.total for p in seen) else None
        etas = [p.eta_s for p in seen if p.eta_s is not None]
        eta = max(etas) if total is not None and len(etas) == parts else None
        return {"done": sum(p.done for p in seen), "total": total, "unit": "batches", "eta_s": eta}

    def _finished(self, handle: str, result: Stored, top_k: int, cached: bool = False) -> View:
        """Assembled from the stored result, which the worker wrote through the contract's types (its parts
        are not validated again)."""
        job = result.job
        view = {
            "id": handle,
            "status": "finished",
            "model": job.model.id,
            "dataset": job.dataset.id,
            "method": job.method,
            "progress": result.progress,
            "timing": result.timing,
            "execution": result.execution,
            "cached": cached,
            "links": links(job.kind, handle),
        }
        if not isinstance(result, StoredAttribution):
            return AnalysisPublic.model_construct(**view, kind=job.kind, result=result.analysis)
        rows = [row.model_copy(update={"proponents": row.proponents[:top_k], "opponents": row.opponents[:top_k]})
                for row in result.rows]  # fmt: skip
        answer = AttributionResult.model_construct(
            shape=result.shape, rows=rows, timing=result.timing, index=result.index
        )
        return AttributionPublic.model_construct(**view, result=answer)


def _encode(view: View) -> bytes:
    return view.model_dump_json().encode()


def failure(job: RQJob) -> str:
    """Why a FAILED job failed: the worker's one-line reason, else the last line of RQ's record of it."""
    if job.meta.get("error"):
        return job.meta["error"]
    result = job.latest_result()
    lines = (result.exc_string or "").strip().splitlines() if result is not None else []
    return lines[-1] if lines else "the job failed without a recorded reason"
