"""`python -m worker`: one warm worker process (run one per GPU, or a few on a CPU host).

RQ's default worker forks per job, which breaks CUDA and throws warm state away, so this is a
`SimpleWorker` that runs jobs in-process with models, shards and base losses kept warm.

Which work it takes first: shard jobs go to affinity queues (contract/jobs.py: `bucket_of`), and each
worker owns a share of them: ATTR_WORKER_QUEUES, or else an even share among the live workers by a slot
it claims in Redis (`fi:slot:<i>`, held while it lives). An idle worker waits on the main queue and its
own affinity queues; after ATTR_STEAL_AFTER_S without such work it takes any other queue's, so a busy
owner never starves a job and a shard's jobs keep landing where the shard is warm. Work the API estimated
as long (contract/cost.py) waits on the long twins of the affinity queues, taken only when nothing else
waits: long work never starves short work.

How a job ends, in RQ's own states:
- it returns: FINISHED (the result and scores are in Redis under its id);
- it raises (input the model cannot take, a registry entry that changed, a timeout, a bug): FAILED, with
  the exception's message (no traceback) in the job's meta "error", and never retried: the same payload
  would fail the same way;
- a cancel sends RQ's stop-job command: this worker's `kill_horse` (it has no horse) sets a flag that the
  job checks between batches (and, where a batch of its sweep runs past ATTR_STOP_WITHIN_S, raises Stopped
  in the job's thread then, as RQ's time limit does: jobs.interruptible), and RQ records it STOPPED;
- its worker is asked to stop (SIGTERM, SIGINT): it finishes the job, then exits (`_shutdown`);
- its worker dies (SIGKILL, OOM): while a job runs, a thread refreshes its heartbeat every
  heartbeat_ttl_s / 3. When the heartbeat lapses (heartbeat_ttl_s after the kill), the next maintenance
  pass of any live worker (every maintenance_interval_s) finds the job abandoned and requeues it (each job
  carries job_retries retries, spent only this way), so the request finishes elsewhere after at most
  heartbeat_ttl_s + maintenance_interval_s (defaults 30 s + 10 s), plus the job's own run time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.retry import Retry as RedisRetry
from rq import Queue, SimpleWorker
from rq.exceptions import AbandonedJobError
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from contract.jobs import ModelRef, queue_names
from contract.kinds import needs
from contract.method import MethodConflict, MethodSettings, resolve_method
from contract.registry import Registry, RegistryError
from contract.results import heartbeat
from contract.settings import Settings

from . import jobs
from .forward_inf import AttributionInputError
from .store import Store
from .warm import Warm, budget, resolve_device

log = logging.getLogger("worker")
MAX_SLOTS = 256  # workers past this many own no affinity queue and take work by stealing only
MEASURE_S, MEASURE_ROWS = 1.0, 16  # the warm-up's measurement of a method's sweep: about a second, 16 rows
STOP_GRACE_S = 2.0  # asked to stop, a worker that cannot reach Redis this long after exits without it


def routine(record: logging.LogRecord) -> bool:
    """RQ's maintenance pass at DEBUG: a line per queue every maintenance interval (476 of 684 lines of a
    serve log), and one per job; shown only where rq.worker logs DEBUG."""
    if str(record.msg).startswith("Worker %s: cleaning "):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("rq.worker").isEnabledFor(logging.DEBUG)
    return True


class Measured(Exception):
    """The warm-up's measurement has seen enough batches."""


def owned_buckets(spec: str, buckets: int) -> set[int]:
    """ATTR_WORKER_QUEUES ('0,4' or '0-3,8') as a set of affinity buckets."""
    owned = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        owned.update(range(int(lo), int(hi or lo) + 1))
    if not owned or not all(0 <= b < buckets for b in owned):
        raise ValueError(f"ATTR_WORKER_QUEUES={spec!r}: bucket numbers in 0..{buckets - 1}, e.g. '0,4' or '0-3'")
    return owned


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
        # a Redis outage is ridden out, not fatal: every command is retried with back-off (rq sets a read
        # timeout that fits its blocking dequeue); a job whose writes still fail is abandoned, then requeued
        backoff = ExponentialWithJitterBackoff(base=0.1, cap=2.0)
        redis = Redis.from_url(settings.redis_url, retry=RedisRetry(backoff, settings.worker_redis_retries))
        name = name or f"{socket.gethostname()}-{os.getpid()}"
        names = queue_names(settings.queue, settings.affinity_buckets)
        self.fixed = (
            owned_buckets(settings.worker_queues, settings.affinity_buckets) if settings.worker_queues else None
        )
        self.slot, self.live = 0, 1  # claimed by the heartbeat when `fixed` is None
        super().__init__(
            [Queue(n, connection=redis, serializer=JSONSerializer) for n in names],
            name=name,
            connection=redis,
            serializer=JSONSerializer,
            maintenance_interval=settings.maintenance_interval_s,
            exception_handlers=[self.record_failure],
            **kwargs,
        )
        self.settings = settings
        store = Store(redis, settings)
        registry = Registry(settings.registry_dir)
        device = resolve_device(settings.device)
        warm = Warm(store, budget(settings, device), device, registry, tuple(settings.python_architectures))
        self.context = jobs.Context(settings, registry, store, warm)
        jobs.bind(self.context)
        self._alive = threading.Event()

    # -- which queue first (module docstring) ----------------------------------------------------------
    def affinity(self) -> tuple[list[Queue], list[Queue]]:
        """(the main queue and this worker's own affinity queues, every other queue): the other affinity
        queues in an order that starts after this worker's slot, so idle workers steal from different
        queues, then the long queues (own first), which no worker takes while other work waits."""
        n = self.settings.affinity_buckets
        main, buckets, long = self.queues[0], self.queues[1 : n + 1], self.queues[n + 1 :]
        if self.fixed is not None:
            own = self.fixed
        else:
            own = {b for b in range(n) if b % self.live == self.slot % self.live}
        start = (self.slot * n) // max(self.live, 1)
        order = [b for b in [*range(start, n), *range(start)] if b not in own]
        mine = [main] + [buckets[b] for b in sorted(own)]
        return mine, [buckets[b] for b in order] + [long[b] for b in [*sorted(own), *order]]

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's dequeue with affinity: wait up to steal_after_s on the main queue and this worker's own
        affinity queues, then take the first job of any other queue; repeat until a job comes (or, in
        burst mode, one pass over all of them)."""
        if timeout is None:  # burst: one non-blocking pass, own queues first
            mine, others = self.affinity()
            self._ordered_queues = mine + others
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        wait = max(1, math.ceil(self.settings.steal_after_s))
        idle = 0
        while (max_idle_time is None or idle < max_idle_time) and not self._stop_requested:
            mine, others = self.affinity()
            self._ordered_queues = mine
            result = super().dequeue_job_and_maintain_ttl(wait, max_idle_time=wait)
            if result is None and others:
                self._ordered_queues = others
                result = super().dequeue_job_and_maintain_ttl(None)
            if result is not None:
                return result
            idle += wait
        return None

    def claim_slot(self) -> None:
        """Hold the lowest free slot among the live workers (renewed by the heartbeat) and learn how many
        there are: this worker then owns the affinity buckets b with b % live == slot."""
        names = [self.settings.key("slot", str(i)) for i in range(MAX_SLOTS)]
        holders = [h.decode() if h else None for h in self.connection.mget(names)]
        ttl = self.settings.ready_ttl_s
        if self.name in holders:
            self.slot = holders.index(self.name)
            self.connection.expire(names[self.slot], ttl)
        else:
            for i, holder in enumerate(holders):
                if holder is None and self.connection.set(names[i], self.name, nx=True, ex=ttl):
                    self.slot, holders[i] = i, self.name
                    break
        self.live = max((i + 1 for i, h in enumerate(holders) if h), default=1)

    def run_maintenance_tasks(self):
        """RQ's (requeue abandoned jobs, clean registries), then remove score files no result needs."""
        super().run_maintenance_tasks()
        try:
            self.context.store.sweep_files()
        except OSError:
            log.warning("score directory cleanup failed", exc_info=True)

    # -- job heartbeats ------------------------------------------------------------------------------
    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_s

    def execute_job(self, job, queue):
        jobs.bind(self.context)
        self.context.stop.clear()
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
            try:
                self.publish()
            except RedisError:  # the readiness heartbeat catches up on its next tick
                log.warning("worker heartbeat failed after job %s", job.id, exc_info=True)

    def _shutdown(self):
        """SIGTERM/SIGINT (RQ's warm shutdown): only record the request. RQ raises StopRequested from
        the signal handler when idle, wherever the main thread is; inside an `except Exception` it is
        swallowed and the worker never stops (measured: logging's emit, writing a maintenance line, did
        it). The dequeue loop above returns within steal_after_s and RQ's work loop then ends; a job in
        flight finishes first. A second signal is RQ's cold shutdown. Where Redis cannot be reached
        STOP_GRACE_S after the request, the worker exits there (`_leave_if_unreachable`)."""
        if not self._stop_requested:
            threading.Thread(target=self._leave_if_unreachable, daemon=True, name="stop-grace").start()
        self._stop_requested = True

    def _leave_if_unreachable(self) -> None:
        """Asked to stop with Redis gone (stopped first by the same Ctrl-C, say), the worker would retry it
        for minutes (every command ~25 s: worker_redis_retries) with nothing it could finish or record:
        exit instead. A job it held is requeued by the fleet once its heartbeat lapses."""
        time.sleep(STOP_GRACE_S)
        probe = Redis.from_url(self.settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            probe.ping()
        except RedisError:
            log.warning("asked to stop, and Redis is unreachable: exiting without it")
            logging.shutdown()
            os._exit(0)
        finally:
            probe.close()

    # -- how jobs end (module docstring) -------------------------------------------------------------
    def kill_horse(self, sig=None) -> None:
        """RQ's stop-job command ends here: stop the running job at its next batch, or ATTR_STOP_WITHIN_S
        from now where a batch of its sweep takes longer (jobs.interrupt)."""
        self.context.stop.set()
        timer = threading.Timer(self.settings.stop_within_s, self._interrupt, (self.get_current_job_id(),))
        timer.daemon = True  # never what a stopping worker waits for
        timer.start()

    def _interrupt(self, job_id: str | None) -> None:
        if jobs.interrupt(self.context):
            log.info("job %s interrupted mid-batch, %g s after its stop command", job_id, self.settings.stop_within_s)

    def handle_exception(self, job, *exc_info):
        """A job stopped on request (a cancel) is not a failure: one INFO line instead of RQ's ERROR with
        a traceback."""
        if isinstance(exc_info[1], jobs.Stopped):
            log.info("job %s stopped on request (canceled)", job.id)
            return
        super().handle_exception(job, *exc_info)

    def record_failure(self, job, exc_type, exc, tb) -> bool:
        """Exception handler: the reason a job failed, in one line, into its meta (the API shows it)."""
        if isinstance(exc, AbandonedJobError) and job.retries_left:
            return True  # requeued: not a failure (one stopped on request never gets here: handle_exception)
        if isinstance(exc, AbandonedJobError):
            reason = "its worker died mid-job (killed, out of memory or lost) on every try"
        elif isinstance(exc, JobTimeoutException):
            reason = f"the job ran past its time limit of {job.timeout} s (ATTR_JOB_TIMEOUT_S)"
        elif isinstance(exc, AttributionInputError | RegistryError):
            reason = str(exc)
        else:
            reason = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
        job.meta["error"] = reason
        job.save_meta()
        return True

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        """An exception raised by the job itself is deterministic: no retry (only abandoned jobs are
        retried, by RQ's registry cleanup). Then wake the long polls."""
        job.retries_left = None
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        try:
            self.context.store.ended(job.id)
        except RedisError:  # a long poll then ends at its deadline instead
            log.warning("could not publish the end of job %s", job.id, exc_info=True)

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
        key = heartbeat(self.settings, self.name)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, self.settings.ready_ttl_s)
            pipe.execute()
        if self.fixed is None:
            self.claim_slot()

    def start_heartbeat(self) -> None:
        """After the warm-up: /readyz counts a worker only once it is warm, and stops within ready_ttl_s
        of its death."""

        def loop():
            while not self._alive.wait(self.settings.ready_ttl_s / 3):
                try:
                    self.publish()
                except Exception:
                    log.warning("worker heartbeat failed", exc_info=True)

        self.publish()
        threading.Thread(target=loop, daemon=True, name="worker-heartbeat").start()

    def warm_up(self) -> None:
        """Prepare every registered model on the datasets it trained on that one job sweeps whole (larger
        ones warm up through their shard jobs), within the budget: load model and shards, compute (or
        fetch) base losses and the default preset's curvature, and take one mirrored step (torch.func's
        first call costs ~2 s), so the first request finds all of it warm."""
        ctx = self.context
        for m in ctx.registry.models():
            for d in ctx.registry.datasets():
                if m.id not in d.trained or len(d.parts(self.settings.part_records)) > 1:
                    continue
                started = time.perf_counter()
                try:
                    for kind in ("attribution", "leakage"):  # both engines stay warm (within the budget)
                        method = resolve_method(MethodSettings(), m.method, needs(kind))
                        fi = jobs.engine(ctx, m, d, method, self.settings.dtype)
                        for n in range(len(d.shards)):
                            jobs.prepare_shard(ctx, fi, m, d, n, self.settings.dtype)
                        rows = ctx.warm.examples(d, list(range(min(MEASURE_ROWS, d.size))))
                        self.measure(fi, fi.mirror(rows), m, method, d.shards[-1].size)
                    log.info("warm-up: %s on %s ready in %.1f s", m.id, d.id, time.perf_counter() - started)
                except (RegistryError, AttributionInputError, MethodConflict, OSError) as exc:
                    log.error("warm-up skipped %s on %s: %s", m.id, d.id, exc)

    def measure(self, fi, mirror, m, method, records: int) -> None:
        """About MEASURE_S of the prepared shard's sweep for `mirror`'s rows: the method's rate on the model,
        which prices requests at the door before any has run (contract/cost.py). Measured on several rows, as
        requests come: one row sweeps faster per row than many (4x on the text model); timed from the end of
        the first batch (the first call chooses how rows are stacked: 2.6x slower on the text model), on a
        second sweep where the first was one batch; a first batch past MEASURE_S is the measurement (a large
        model's warm-up takes no second batch)."""
        ticks = [time.perf_counter()]

        def tick(_done: int, _total) -> None:
            ticks.append(time.perf_counter())
            if ticks[-1] - ticks[0] > MEASURE_S:
                raise Measured

        with contextlib.suppress(Measured):
            for _ in range(2):
                fi.sweep(mirror, tick)
        first = 1 if len(ticks) > 2 else 0
        rows = min(mirror.test_loss.shape[0], fi.config.max_param_sets)  # a pass's rows
        swept = (len(ticks) - 1 - first) * min(records, fi.config.batch_size) * rows  # record-rows timed
        self.context.store.measured(ModelRef(id=m.id, digest=m.digest), self.settings.dtype, method,
                                    ticks[-1] - ticks[first], swept)  # fmt: skip

    def unsubscribe(self):
        """RQ's, with a bounded wait for its pubsub thread. RQ unsubscribes, then calls the thread's stop(), which
        since redis-py 8 joins it without a bound; a thread that took the unsubscribe reply and looped before
        the stop flag was cleared waits for a subscription for RQ's whole 60 s poll, so a SIGTERM took up to a
        minute (tests saw it after a cancel). The flag is cleared aside, the reply wakes a blocking read, and
        the thread (a daemon) gets a second."""
        thread = self.pubsub_thread
        if thread:
            threading.Thread(target=thread.stop, daemon=True).start()  # clears the flag; its own join is unbounded
            self.pubsub.unsubscribe()
            thread.join(timeout=1)

    def teardown(self):
        self._alive.set()
        self.connection.delete(heartbeat(self.settings, self.name))
        if self.fixed is None and self.connection.get(self.settings.key("slot", str(self.slot))) == self.name.encode():
            self.connection.delete(self.settings.key("slot", str(self.slot)))
        super().teardown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    parser.add_argument("--name", default=None)
    parser.add_argument("--healthcheck", action="store_true", help="exit 0 if a worker of this host is ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, tried in turn
    logging.getLogger("rq.worker").addFilter(routine)
    settings = Settings()
    if settings.torch_threads:  # e.g. one thread per worker, N workers on an N-core host
        import torch

        from .search import threads

        torch.set_num_threads(settings.torch_threads)
        threads(settings.torch_threads)
    if args.healthcheck:  # a container's health check: its worker's readiness heartbeat is alive
        mine = Redis.from_url(settings.redis_url).scan_iter(match=heartbeat(settings, f"{socket.gethostname()}-*"))
        sys.exit(0 if next(mine, None) is not None else 1)
    worker = WarmWorker(settings, name=args.name)
    log.info(
        "worker %s on %s (warm budget %.2f GiB), queues %s (+%d affinity), registry %s",
        worker.name,
        worker.context.warm.device,
        worker.context.warm.budget / 2**30,
        settings.queue,
        settings.affinity_buckets,
        settings.registry_dir,
    )
    if settings.warm_on_start:
        worker.warm_up()
    worker.start_heartbeat()
    worker.work(burst=args.burst)


if __name__ == "__main__":
    main()
