"""Real worker processes (`python -m worker`): readiness, cancel while running, a long poll woken by the
job's end, a worker SIGKILLed mid-job whose request another worker finishes, and one SIGTERMed mid-job
that finishes the job, then exits."""

import signal
import time

import pytest
import redis as redis_lib
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from tests.conftest import running_mid_job, start_worker, stop_worker, submit, wait_for

pytestmark = pytest.mark.slow


def test_sigkilled_worker_mid_job_is_finished_by_another(api, big_settings):
    from worker.__main__ import WarmWorker

    victim = start_worker(big_settings, "victim")
    try:
        wait_for(lambda: api.get("/readyz").status_code == 200)
        url = submit(api)
        seen = wait_for(lambda: running_mid_job(api, url))
        assert seen["progress"]["eta_s"] is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        assert api.get(url).json()["status"] == "running"  # nothing has noticed yet
    finally:
        victim.kill()
    # a second worker: its maintenance pass requeues the job once the dead worker's heartbeat lapses
    rescuer = WarmWorker(big_settings, name="rescuer")
    wait_for(lambda: time.monotonic() - killed_at > big_settings.heartbeat_ttl_s + 0.5)
    rescuer.work(burst=True)
    done = api.get(url).json()
    assert done["status"] == "finished", done
    assert len(done["result"]["rows"]) == 16


def test_cancel_a_running_job(api, big_settings):
    worker = start_worker(big_settings, "busy")
    try:
        url = submit(api)
        wait_for(lambda: running_mid_job(api, url))
        response = api.delete(url)
        assert response.status_code == 202 and response.json()["status"] == "canceled"
        redis = redis_lib.Redis.from_url(big_settings.redis_url)
        key = redis.hget(big_settings.key("handle", response.json()["id"]), "key").decode()
        computation = RQJob.fetch(key, connection=redis, serializer=JSONSerializer)
        wait_for(lambda: computation.get_status() == JobStatus.STOPPED, timeout=30)  # RQ's state, by its stop command
        progress = computation.get_meta(refresh=True)["progress"]
        assert progress["done"] < progress["total"]  # it stopped mid-job: no other tenant wanted it
        assert worker.poll() is None  # the worker stays up for the next job
    finally:
        stop_worker(worker)
    log = worker.log.read_text()  # a cancel is one INFO line; RQ's maintenance (every 1 s here) is not logged
    assert "stopped on request (canceled)" in log and "Traceback" not in log and "cleaning registries" not in log


def test_a_long_poll_returns_as_soon_as_the_job_ends(big_settings):
    """One request, held until the job's end is published: it answers finished, well before its (generous)
    deadline, whatever the machine's load (a loaded one once ran the job past a 25 s window)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    deadline = 600
    worker = start_worker(big_settings, "poller")
    try:
        with TestClient(create_app(big_settings.model_copy(update={"max_wait_s": deadline}))) as api:
            wait_for(lambda: api.get("/readyz").status_code == 200)
            url = submit(api)
            start = time.monotonic()
            done = api.get(url, params={"wait_s": deadline}).json()
            elapsed = time.monotonic() - start
    finally:
        stop_worker(worker)
    assert done["status"] == "finished", done
    assert done["timing"]["sweep_s"] < elapsed < deadline / 2  # it waited for the job, not for the deadline


def test_a_sigterm_mid_job_finishes_the_job_then_exits(api, big_settings):
    worker = start_worker(big_settings, "draining")
    try:
        wait_for(lambda: api.get("/readyz").status_code == 200)
        url = submit(api)
        wait_for(lambda: running_mid_job(api, url))
        worker.send_signal(signal.SIGTERM)  # as `docker stop` does
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    done = api.get(url).json()
    assert done["status"] == "finished", done
