"""Jobs from the API's side (attributions and analyses): cache key, score-cache lookup, dedup, enqueue,
status, cancel.

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
from .schemas import (
    AnalysisPublic,
    AttributionCreate,
    AttributionJob,
    AttributionPublic,
    AttributionResult,
    LeakageCreate,
    MemorizationCreate,
    MislabeledCreate,
    Progress,
)
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


Request = AttributionCreate | LeakageCreate | MislabeledCreate | MemorizationCreate
PRESET = {"leakage": "leakage", "mislabeled": "mislabeled", "memorization": "attribution"}


def job_payload(kind: str, request: Request, model: ModelManifest, dataset: DatasetManifest) -> AttributionJob:
    """The request resolved into the worker's payload. Its `key` (the job id and cache key) hashes
    what the result depends on: digests (a changed checkpoint never hits), kind, test points, options
    and the method settings over the analysis' preset and the model's defaults. top_k is not part of it."""
    test = {"mislabeled": "reference", "memorization": "records"}.get(kind, "test")
    own = {"model", "dataset", "method", "top_k", test}
    material = {
        "kind": kind,
        "test": getattr(request, test).model_dump(mode="json", exclude_none=True),
        "options": request.model_dump(mode="json", exclude=own, exclude_none=True),
        "method": {**model.method, **request.method.model_dump(exclude_none=True)},
    }
    if kind in PRESET and "preset" not in material["method"]:
        material["method"]["preset"] = PRESET[kind]
    digest = json.dumps({**material, "model": model.digest, "dataset": dataset.digest}, sort_keys=True)
    return AttributionJob(
        key=hashlib.sha256(digest.encode()).hexdigest()[:32],
        model=model.id,
        model_digest=model.digest,
        dataset=dataset.id,
        dataset_digest=dataset.digest,
        top_k=getattr(request, "top_k", 10),
        **material,
    )


class Jobs:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings
        self.queue = Queue(settings.queue, connection=redis, serializer=JSONSerializer)

    def _result(self, key: str) -> dict | None:
        raw = self.redis.get(self.settings.key("result", key))
        return json.loads(raw) if raw else None

    def submit(
        self, kind: str, request: Request, model: ModelManifest, dataset: DatasetManifest
    ) -> tuple[AttributionPublic | AnalysisPublic, bool]:
        """Returns (the job's public view, whether it is a finished result from the cache)."""
        payload = job_payload(kind, request, model, dataset)
        key, top_k = payload.key, payload.top_k
        if (result := self._result(key)) is not None:
            return self._public(key, None, result, top_k), True
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
                meta={"kind": kind, "model": model.id, "dataset": dataset.id, "top_k": top_k},
            )
        except DuplicateJobError:  # an identical request is queued or running: join it
            job = self._job(key)
        return self._public(key, job, None, top_k), False

    def get(
        self, key: str, top_k: int | None = None, wait_s: float = 0.0, analysis: bool = False
    ) -> AttributionPublic | AnalysisPublic:
        """The job's public view; with `wait_s`, wait up to that long for it to end (a long poll, so
        clients need not poll in a tight loop). An attribution id asked for as an analysis (or the
        reverse) is unknown there."""
        deadline = time.monotonic() + wait_s
        job = self._fetch(key)  # once: _public refreshes its status and meta on each look
        top_k = top_k or (job.meta.get("top_k") if job else None) or 10  # default: the creating request's
        while True:
            result = self._result(key)
            kind = result.get("kind", "attribution") if result else job.meta.get("kind", "attribution") if job else None
            if kind is None or (kind != "attribution") != analysis:
                raise NotFound(f"no {'analysis' if analysis else 'attribution'} {key!r} (unknown, or expired)")
            if result is not None:
                return self._public(key, None, result, top_k)
            public = self._public(key, job, None, top_k)
            if public.status not in ("queued", "running") or time.monotonic() >= deadline:
                return public
            time.sleep(self.settings.long_poll_interval_s)

    def finished(self, key: str, analysis: bool) -> tuple[dict, bytes]:
        """The stored result and raw scores of a finished job: one read each on the hot path; 404 when
        unknown (or of the other family), 409 when not finished or its scores expired."""
        result = self._result(key)
        if result is None or (result.get("kind", "attribution") != "attribution") != analysis:
            public = self.get(key, analysis=analysis)  # NotFound when unknown
            raise Conflict(f"{key!r} is {public.status}: no result yet")
        raw = self.redis.get(self.settings.key("scores", key))
        if raw is None:
            raise Conflict(f"{key!r}: its scores expired; submit the request again")
        return result, raw

    def _fetch(self, key: str) -> Job | None:
        try:
            return Job.fetch(key, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def _job(self, key: str) -> Job:
        if (job := self._fetch(key)) is None:
            raise NotFound(f"no job {key!r} (unknown, or its record expired)")
        return job

    def cancel(self, key: str, analysis: bool = False) -> AttributionPublic | AnalysisPublic:
        public = self.get(key, analysis=analysis)
        if public.status == "finished":
            raise Conflict(f"{key!r} has finished; there is nothing to cancel")
        job = self._job(key)
        status = job.get_status()
        if status == JobStatus.STARTED:
            self.redis.set(self.settings.key("cancel", key), 1, ex=self.settings.job_timeout_s)
        elif STATUS.get(status) == "queued":
            job.cancel()
        return self._public(key, job, None, None)

    def _public(
        self, key: str, job: Job | None, result: dict | None, top_k: int | None
    ) -> AttributionPublic | AnalysisPublic:
        kind = (result if result is not None else job.meta).get("kind", "attribution")
        base = f"/v1/{'attributions' if kind == 'attribution' else 'analyses'}/{key}"
        links = {"self": base, "scores": f"{base}/scores", "report": f"{base}/report"}
        if result is not None:
            common = {
                "id": key,
                "status": "finished",
                "model": result["model"],
                "dataset": result["dataset"],
                "progress": Progress(**result.get("progress", {})),
                "timing": result.get("timing"),
                "cached": job is None,
                "links": links,
            }
            if kind != "attribution":
                return AnalysisPublic(kind=kind, result=result["analysis"], **common)
            k = top_k or 10
            rows = [
                {**row, "proponents": row["proponents"][:k], "opponents": row["opponents"][:k]}
                for row in result["rows"]
            ]
            return AttributionPublic(result=AttributionResult(**{**result, "rows": rows}), **common)
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
        common = {
            "id": key,
            "status": status,
            "model": meta.get("model", ""),
            "dataset": meta.get("dataset", ""),
            "progress": Progress(**meta.get("progress", {})),
            "timing": meta.get("timing"),
            "error": error,
            "links": links,
        }
        return AttributionPublic(**common) if kind == "attribution" else AnalysisPublic(kind=kind, **common)
