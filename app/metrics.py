"""Prometheus metrics: request counts and latency, plus a scrape-time view of Redis: queue depth, and
what each worker reports in its heartbeat (memory, jobs, durations, cache counters).

With several API processes (uvicorn --workers), set PROMETHEUS_MULTIPROC_DIR to an empty directory
(scripts/serve does): each process then writes its counts there and a scrape sums all of them,
prometheus_client's multiprocess mode."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from redis import Redis

from contract.results import heartbeat
from contract.settings import Settings

from .jobs import queued

REGISTRY = CollectorRegistry()
REQUESTS = Counter("attr_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "attr_http_request_seconds",
    "HTTP request latency",
    ["route"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CACHE = Counter(
    "attr_score_cache_requests_total", "attribution requests by score-cache outcome", ["result"], registry=REGISTRY
)
WORKER_FIELDS = {  # heartbeat field -> (metric, help)
    "rss_bytes": ("attr_worker_memory_bytes", "worker resident memory"),
    "warm_bytes": ("attr_worker_warm_bytes", "bytes held in the worker's warm cache"),
    "jobs": ("attr_worker_jobs_total", "jobs the worker finished"),
    "job_seconds": ("attr_worker_job_seconds_total", "time the worker spent in jobs"),
    "model_loads": ("attr_worker_model_loads_total", "models loaded from the registry"),
    "base_computes": ("attr_worker_base_loss_computes_total", "base-loss sweeps computed (not found warm or in Redis)"),
}


def live_workers(redis: Redis, settings: Settings) -> list[dict[str, str]]:
    """Heartbeat hashes of the workers alive now (each expires unless its worker refreshes it)."""
    keys = sorted(redis.scan_iter(match=heartbeat(settings, "*"), count=100))
    return [{k.decode(): v.decode() for k, v in redis.hgetall(key).items()} for key in keys]


def render(redis: Redis, settings: Settings) -> tuple[bytes, str]:
    depth = queued(redis, settings)
    workers = live_workers(redis, settings)
    families = [
        GaugeMetricFamily("attr_queue_depth", "jobs waiting in the queues", value=depth),
        GaugeMetricFamily("attr_workers", "workers with a live heartbeat", value=len(workers)),
    ]
    for field, (name, help) in WORKER_FIELDS.items():
        family = GaugeMetricFamily(name, help, labels=["worker"])
        for w in workers:
            if field in w:
                family.add_metric([w.get("name", "?")], float(w[field]))
        families.append(family)

    class Snapshot:
        def collect(self):
            return families

    scrape = CollectorRegistry()
    scrape.register(Snapshot())
    own = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every API process's counts, not this one's alone
        own = CollectorRegistry()
        multiprocess.MultiProcessCollector(own)
    return generate_latest(own) + generate_latest(scrape), CONTENT_TYPE_LATEST
