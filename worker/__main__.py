"""`python -m worker`: one warm worker process (run one per GPU, or a few on a CPU host).

RQ's default worker forks per job, which breaks CUDA and throws warm state away, so this is a
`SimpleWorker` that runs jobs in-process with models, shards and base losses kept warm.

Recovery from a worker killed mid-job (SIGKILL, OOM): while a job runs, a thread refreshes its
heartbeat every heartbeat_ttl_s / 3. When the heartbeat lapses (heartbeat_ttl_s after the kill),
the next maintenance pass of any live worker (every maintenance_interval_s) finds the job abandoned
and requeues it (each job carries job_retries retries), so the request finishes elsewhere after at
most heartbeat_ttl_s + maintenance_interval_s (defaults 30 s + 10 s), plus the job's own run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading

import torch
from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from app.settings import Settings

from . import jobs
from .forward_inf import AttributionInputError
from .registry import Registry, RegistryError
from .store import Store
from .warm import Warm, resolve_device

log = logging.getLogger("worker")


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class WarmWorker(SimpleWorker):
    """A SimpleWorker with a warm cache, short job heartbeats and a readiness heartbeat in Redis."""

    def __init__(self, settings: Settings, name: str | None = None, **kwargs):
        redis = Redis.from_url(settings.redis_url)  # rq sets a read timeout that fits its blocking dequeue
        name = name or f"{socket.gethostname()}-{os.getpid()}"
        super().__init__(
            [Queue(settings.queue, connection=redis, serializer=JSONSerializer)],
            name=name,
            connection=redis,
            serializer=JSONSerializer,
            maintenance_interval=settings.maintenance_interval_s,
            **kwargs,
        )
        self.settings = settings
        store = Store(redis, settings)
        warm = Warm(store, settings.warm_bytes, resolve_device(settings.device), getattr(torch, settings.dtype))
        self.context = jobs.Context(settings, Registry(settings.registry_dir), store, warm)
        jobs.bind(self.context)
        self._alive = threading.Event()

    # -- job heartbeats ------------------------------------------------------------------------------
    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_s

    def execute_job(self, job, queue):
        jobs.bind(self.context)
        done = threading.Event()

        def beat():
            while not done.wait(self.settings.heartbeat_ttl_s / 3):
                execution = self.execution
                if execution is not None:
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception:  # a missed beat is retried on the next tick
                        log.warning("job heartbeat failed", exc_info=True)

        thread = threading.Thread(target=beat, daemon=True, name="job-heartbeat")
        thread.start()
        try:
            return super().execute_job(job, queue)
        finally:
            done.set()
            self.publish()

    # -- readiness heartbeat -------------------------------------------------------------------------
    def publish(self) -> None:
        """The worker's live record: read by /readyz and /metrics (and by tests, for the counters)."""
        ctx = self.context
        fields = {
            "name": self.name,
            "device": str(ctx.warm.device),
            "rss_bytes": rss_bytes(),
            "warm_bytes": ctx.warm.bytes,
            **ctx.stats,
            **ctx.warm.counters,
        }
        key = self.settings.key("worker", self.name)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, max(3, self.settings.heartbeat_ttl_s))
            pipe.execute()

    def start_heartbeat(self) -> None:
        def loop():
            while not self._alive.wait(max(1.0, self.settings.heartbeat_ttl_s / 3)):
                try:
                    self.publish()
                except Exception:
                    log.warning("worker heartbeat failed", exc_info=True)

        self.publish()
        threading.Thread(target=loop, daemon=True, name="worker-heartbeat").start()

    def warm_up(self) -> None:
        """Prepare every registered model on the datasets it trained on, within the budget: load model
        and shards, compute (or fetch) base losses and the default preset's curvature, and take one
        mirrored step (torch.func's first call costs ~2 s), so the first request finds all of it warm."""
        ctx = self.context
        for m in ctx.registry.models():
            for d in ctx.registry.datasets():
                if m.id not in d.trained:
                    continue
                try:
                    shards = [ctx.warm.shard(d, n) for n in range(len(d.shards))]
                    fi, *_ = jobs.prepared(ctx, m, d, shards, m.method)
                    fi.mirror({k: v[:1] for k, v in shards[0].items()})
                except (RegistryError, AttributionInputError, OSError) as exc:
                    log.error("warm-up skipped %s on %s: %s", m.id, d.id, exc)

    def teardown(self):
        self._alive.set()
        self.connection.delete(self.settings.key("worker", self.name))
        super().teardown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    worker = WarmWorker(settings, name=args.name)
    log.info(
        "worker %s on %s, queue %s, registry %s",
        worker.name,
        worker.context.warm.device,
        settings.queue,
        settings.registry_dir,
    )
    if settings.warm_on_start:
        worker.warm_up()
    worker.start_heartbeat()
    worker.work(burst=args.burst)


if __name__ == "__main__":
    main()
