"""Jobs from the API's side (attributions and analyses): cache lookup, dedup, enqueue, status, long polls,
cancel.

The job id is the resolved payload's identity (`Job.key`, contract/jobs.py), so an identical request finds
its finished result (a 200 from the cache) or joins the job already queued or running; `unique=True`
makes the enqueue itself race-free. States are RQ's own: FAILED (with the worker's one-line reason in
the job's meta, no traceback), STOPPED (a running job canceled) and CANCELED (a queued one). Only a job
whose worker died is retried (RQ's registry cleanup, `job_retries` times); one that raised is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import OrderedDict

from redis import Redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus, Retry
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from contract.jobs import JOB_FUNC, Job
from contract.schemas import AnalysisPublic, AttributionPublic
from contract.settings import Settings

from .errors import Conflict, NotFound
from .events import Events

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
ENDED = (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED, JobStatus.FINISHED)
View = dict  # a job's public view, JSON-ready: the AttributionPublic or AnalysisPublic schema (contract/schemas.py)


def links(kind: str, key: str) -> dict[str, str]:
    base = f"/v1/{'attributions' if kind == 'attribution' else 'analyses'}/{key}"
    return {"self": base, "scores": f"{base}/scores", "report": f"{base}/report"}


class Results:
    """Finished results, parsed once per API process. A result never changes under its id (the id hashes
    everything it depends on), so a popular one (a report, the long polls that one job's end wakes) is
    read and parsed once; a hit costs one EXISTS, so an expired result is never served. Bounded by the
    stored JSON's size (`result_cache_bytes`); shared by the request threads."""

    def __init__(self, budget_bytes: int):
        self.budget, self.bytes, self.items, self.lock = budget_bytes, 0, OrderedDict(), threading.Lock()
        self.loading: dict[str, threading.Lock] = {}  # one reader per result: concurrent misses wait for it

    def get(self, redis: Redis, name: str) -> dict | None:
        with self.lock:
            hit = self.items.get(name)
        if hit is not None:
            alive = redis.exists(name)
            with self.lock:
                if name in self.items:
                    self.items.move_to_end(name)
                    if not alive:  # expired (or deleted) in Redis: never served from here either
                        self.bytes -= self.items.pop(name)[1]
            if alive:
                return hit[0]
        with self.lock:
            loading = self.loading.setdefault(name, threading.Lock())
        with loading:
            with self.lock:
                hit = self.items.get(name)
            if hit is not None:  # another thread read it meanwhile
                return hit[0]
            raw = redis.get(name)
            result = json.loads(raw) if raw is not None else None
            with self.lock:
                self.loading.pop(name, None)
                if result is not None:
                    self.items[name], self.bytes = (result, len(raw)), self.bytes + len(raw)
                while self.bytes > self.budget and len(self.items) > 1:
                    self.bytes -= self.items.popitem(last=False)[1][1]
        return result


class Jobs:
    def __init__(self, redis: Redis, settings: Settings, events: Events, results: Results):
        self.redis, self.settings, self.events, self.results = redis, settings, events, results
        self.queue = Queue(settings.queue, connection=redis, serializer=JSONSerializer)

    def _result(self, key: str) -> dict | None:
        result = self.results.get(self.redis, self.settings.key("result", key))
        return result if result is not None and "job" in result else None  # else stored by an earlier release

    def _fetch(self, key: str) -> RQJob | None:
        try:
            job = RQJob.fetch(key, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        return job if job.args and "engine_version" in job.args[0] else None  # else enqueued by an earlier release

    def submit(self, job: Job, top_k: int | None = None) -> tuple[View, bool]:
        """Returns (the job's public view, whether it is a finished result from the cache)."""
        key = job.key
        if (result := self._result(key)) is not None:
            return self._finished(key, result, top_k, cached=True), True
        existing = self._fetch(key)
        if existing is not None and existing.get_status(refresh=False) in ENDED:
            existing.delete()  # a new try; finished without a stored result = its result expired
        retries = self.settings.job_retries
        try:
            rq_job = self.queue.enqueue(
                JOB_FUNC,
                job.model_dump(mode="json"),
                job_id=key,
                unique=True,
                job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.job_record_ttl_s,
                failure_ttl=self.settings.job_record_ttl_s,
                ttl=self.settings.job_record_ttl_s,
                retry=Retry(max=retries) if retries else None,  # spent only on abandoned runs (worker/__main__.py)
                meta={"kind": job.kind, "model": job.model.id, "dataset": job.dataset.id, "top_k": top_k},
            )
        except DuplicateJobError:  # an identical request is queued or running: join it
            rq_job = self._job(key)
        return self._active(key, rq_job, top_k), False

    def view(self, key: str, top_k: int | None = None, analysis: bool = False) -> View:
        """The job's public view, from one read of its result and (if none) one of its RQ record. An
        attribution id asked for as an analysis (or the reverse) is unknown there."""
        result = self._result(key)
        job = None if result is not None and top_k else self._fetch(key)  # its meta: the creating request's top_k
        kind = result["job"]["kind"] if result is not None else job.meta.get("kind") if job is not None else None
        if kind is None or (kind != "attribution") != analysis:
            raise NotFound(f"no {'analysis' if analysis else 'attribution'} {key!r} (unknown, or expired)")
        top_k = top_k or (job.meta.get("top_k") if job is not None else None)
        return self._finished(key, result, top_k) if result is not None else self._active(key, job, top_k)

    def _look(self, key: str, top_k: int | None, analysis: bool) -> tuple[str, bytes]:
        public = self.view(key, top_k, analysis)
        return public["status"], json.dumps(public, allow_nan=False).encode()

    async def wait(self, key: str, top_k: int | None, wait_s: float, analysis: bool = False) -> bytes:
        """The view (as JSON) once the job has ended or `wait_s` has passed: a long poll that holds no
        thread and polls nothing (the job's end, published by its worker, wakes it). Reading and
        serialising run in a thread, so the event loop only waits."""
        deadline = time.monotonic() + wait_s
        with self.events.watch(key) as ended:
            while True:
                ended.clear()  # before the read: an end published during it still wakes the wait below
                status, body = await run_in_threadpool(self._look, key, top_k, analysis)
                remaining = deadline - time.monotonic()
                if status not in ACTIVE or remaining <= 0:
                    return body
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), remaining)

    def finished(self, key: str, analysis: bool) -> tuple[dict, bytes]:
        """The stored result and raw scores of a finished job: one read each; 404 when unknown (or of the
        other family), 409 when not finished or its scores expired."""
        result = self._result(key)
        if result is None or (result["job"]["kind"] != "attribution") != analysis:
            public = self.view(key, analysis=analysis)  # NotFound when unknown
            raise Conflict(f"{key!r} is {public['status']}: no result yet")
        raw = self.redis.get(self.settings.key("scores", key))
        if raw is None:
            raise Conflict(f"{key!r}: its scores expired; submit the request again")
        return result, raw

    def cancel(self, key: str, analysis: bool = False) -> View:
        """A queued job is CANCELED at once; a running one is told to stop (RQ's stop-job command) and
        becomes STOPPED at its next batch."""
        if self.view(key, analysis=analysis)["status"] == "finished":
            raise Conflict(f"{key!r} has finished; there is nothing to cancel")
        job = self._job(key)
        status = job.get_status(refresh=False)
        if status == JobStatus.STARTED:
            with contextlib.suppress(InvalidJobOperation):  # it ended meanwhile
                send_stop_job_command(self.redis, key, serializer=JSONSerializer)
        elif STATUS.get(status) == "queued":
            with contextlib.suppress(InvalidJobOperation):
                job.cancel()
            self.redis.publish(self.settings.key("events"), key)
        return self.view(key, analysis=analysis)

    def _job(self, key: str) -> RQJob:
        if (job := self._fetch(key)) is None:
            raise NotFound(f"no job {key!r} (unknown, or its record expired)")
        return job

    def _finished(self, key: str, result: dict, top_k: int | None, cached: bool = False) -> View:
        """Assembled from the stored result, which the worker wrote through the contract's schemas (the
        hot path validates nothing again; tests check the views against the schemas)."""
        job = result["job"]
        view = {
            "id": key,
            "status": "finished",
            "model": job["model"]["id"],
            "dataset": job["dataset"]["id"],
            "method": job["method"],
            "progress": result["progress"],
            "timing": result["timing"],
            "execution": result["execution"],
            "error": None,
            "cached": cached,
            "links": links(job["kind"], key),
        }
        if job["kind"] != "attribution":
            return {**view, "kind": job["kind"], "result": result["analysis"]}
        k = top_k or 10
        rows = [
            {**row, "proponents": row["proponents"][:k], "opponents": row["opponents"][:k]} for row in result["rows"]
        ]
        return {**view, "result": {"shape": result["shape"], "rows": rows, "timing": result["timing"]}}

    def _active(self, key: str, job: RQJob, top_k: int | None) -> View:
        status = STATUS.get(job.get_status(refresh=False), "queued")
        meta, kind = job.meta, job.meta.get("kind", "attribution")
        common = {
            "id": key,
            "status": status,
            "model": meta.get("model", ""),
            "dataset": meta.get("dataset", ""),
            "method": job.args[0]["method"],
            "progress": meta.get("progress", {}),
            "timing": meta.get("timing"),
            "error": failure(job) if status == "failed" else None,
            "links": links(kind, key),
        }
        public = AttributionPublic(**common) if kind == "attribution" else AnalysisPublic(kind=kind, **common)
        return public.model_dump(mode="json")


def failure(job: RQJob) -> str:
    """Why a FAILED job failed: the worker's one-line reason, else the last line of RQ's record of it."""
    if job.meta.get("error"):
        return job.meta["error"]
    result = job.latest_result()
    lines = (result.exc_string or "").strip().splitlines() if result is not None else []
    return lines[-1] if lines else "the job failed without a recorded reason"
