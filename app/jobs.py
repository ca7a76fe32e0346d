"""Attribution jobs from the API's side: cache key, score-cache lookup, dedup, enqueue, status, cancel.

The job id is the cache key (a hash of model digest, dataset digest, test payload and method), so an
identical request finds the finished scores (a 200 from the cache) or the job already queued or running
(no duplicate work); `unique=True` makes the enqueue itself race-free.
"""

from __future__ import annotations

import hashlib
import json
import time

from redis import Redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer

from worker.registry import DatasetManifest, ModelManifest

from .errors import Conflict, NotFound
from .schemas import AttributionCreate, AttributionJob, AttributionPublic, AttributionResult, Progress
from .settings import Settings

JOB_FUNC = "worker.jobs.attribute"
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


def cache_key(model: ModelManifest, dataset: DatasetManifest, request: AttributionCreate) -> str:
    """What the scores depend on, hashed: digests (so a changed checkpoint never hits), the test payload
    and the method settings with the model's defaults beneath them. top_k is not part of it."""
    material = {
        "model": model.digest,
        "dataset": dataset.digest,
        "test": request.test.model_dump(mode="json", exclude_none=True),
        "method": {**model.method, **request.method.model_dump(exclude_none=True)},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


class Jobs:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings
        self.queue = Queue(settings.queue, connection=redis, serializer=JSONSerializer)

    def _result(self, key: str) -> dict | None:
        raw = self.redis.get(self.settings.key("result", key))
        return json.loads(raw) if raw else None

    def submit(
        self, request: AttributionCreate, model: ModelManifest, dataset: DatasetManifest
    ) -> tuple[AttributionPublic, bool]:
        """Returns (the job's public view, whether it is a finished result from the cache)."""
        key = cache_key(model, dataset, request)
        if (result := self._result(key)) is not None:
            return self._public(key, None, result, request.top_k), True
        payload = AttributionJob(
            key=key,
            model=model.id,
            model_digest=model.digest,
            dataset=dataset.id,
            dataset_digest=dataset.digest,
            test=request.test,
            method={**model.method, **request.method.model_dump(exclude_none=True)},
            top_k=request.top_k,
        )
        existing = self._fetch(key)
        ended = (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED, JobStatus.FINISHED)
        if existing is not None and existing.get_status() in ended:
            existing.delete()  # a new try; finished without a cached result = canceled or expired
        self.redis.delete(self.settings.key("cancel", key))
        try:
            job = self.queue.enqueue(
                JOB_FUNC,
                payload.model_dump(mode="json"),
                job_id=key,
                unique=True,
                job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.job_record_ttl_s,
                failure_ttl=self.settings.job_record_ttl_s,
                ttl=self.settings.job_record_ttl_s,
                retry=Retry(max=self.settings.job_retries) if self.settings.job_retries else None,
                meta={"model": model.id, "dataset": dataset.id, "top_k": request.top_k},
            )
        except DuplicateJobError:  # an identical request is queued or running: join it
            job = self._job(key)
        return self._public(key, job, None, request.top_k), False

    def get(self, key: str, top_k: int | None = None, wait_s: float = 0.0) -> AttributionPublic:
        """The job's public view; with `wait_s`, wait up to that long for it to end (a long poll, so
        clients need not poll in a tight loop)."""
        deadline = time.monotonic() + wait_s
        job = self._fetch(key)  # once: _public refreshes its status and meta on each look
        top_k = top_k or (job.meta.get("top_k") if job else None) or 10  # default: the creating request's
        while True:
            if (result := self._result(key)) is not None:
                return self._public(key, None, result, top_k)
            if job is None:
                raise NotFound(f"no attribution {key!r} (unknown, or its record expired)")
            public = self._public(key, job, None, top_k)
            if public.status not in ("queued", "running") or time.monotonic() >= deadline:
                return public
            time.sleep(self.settings.long_poll_interval_s)

    def _fetch(self, key: str) -> Job | None:
        try:
            return Job.fetch(key, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def _job(self, key: str) -> Job:
        if (job := self._fetch(key)) is None:
            raise NotFound(f"no attribution {key!r} (unknown, or its record expired)")
        return job

    def cancel(self, key: str) -> AttributionPublic:
        if self._result(key) is not None:
            raise Conflict(f"attribution {key!r} has finished; there is nothing to cancel")
        job = self._job(key)
        status = job.get_status()
        if status == JobStatus.STARTED:
            self.redis.set(self.settings.key("cancel", key), 1, ex=self.settings.job_timeout_s)
        elif STATUS.get(status) == "queued":
            job.cancel()
        return self._public(key, job, None, None)

    def scores(self, key: str) -> tuple[tuple[int, int], bytes]:
        result = self._result(key)
        raw = self.redis.get(self.settings.key("scores", key)) if result else None
        if raw is None:
            self.get(key)  # 404 if unknown
            raise Conflict(f"attribution {key!r} has no scores yet (not finished)")
        return tuple(result["shape"]), raw

    def _public(self, key: str, job: Job | None, result: dict | None, top_k: int | None) -> AttributionPublic:
        links = {"self": f"/v1/attributions/{key}", "scores": f"/v1/attributions/{key}/scores"}
        if result is not None:
            k = top_k or 10
            rows = [
                {**row, "proponents": row["proponents"][:k], "opponents": row["opponents"][:k]}
                for row in result["rows"]
            ]
            full = AttributionResult(**{**result, "rows": rows})
            return AttributionPublic(
                id=key,
                status="finished",
                model=result["model"],
                dataset=result["dataset"],
                progress=Progress(**result.get("progress", {})),
                timing=full.timing,
                result=full,
                cached=job is None,
                links=links,
            )
        meta = job.get_meta(refresh=True)
        status = STATUS.get(job.get_status(), "queued")
        if meta.get("canceled"):
            status = "canceled"
        elif meta.get("failed"):
            status = "failed"
        error = None
        if status == "failed":
            error = (
                meta.get("error") or "the job failed: its worker stopped (killed, timed out or out of memory) too often"
            )
        return AttributionPublic(
            id=key,
            status=status,
            model=meta.get("model", ""),
            dataset=meta.get("dataset", ""),
            progress=Progress(**meta.get("progress", {})),
            timing=meta.get("timing"),
            error=error,
            links=links,
        )
