"""Real worker processes (`python -m worker`): readiness, cancel while running, a long poll woken by the
job's end, and a worker SIGKILLed mid-job whose request another worker finishes."""

import shutil
import signal
import subprocess
import time

import pytest
import redis as redis_lib
import torch
from rq.job import Job as RQJob
from rq.job import JobStatus
from safetensors.torch import load_file, save_file

from contract.registry import Registry
from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture
def big_settings(settings, registry_dir, tmp_path):
    """The demo registry plus `digits-big`: the digits training set tiled 40x (57,480 records), so that
    a job runs long enough (a few seconds, batch 32) to be interrupted."""
    root = tmp_path / "registry"
    shutil.copytree(registry_dir, root)
    registry = Registry(root)
    train = registry.dataset("digits-train")
    parts = [load_file(train.path / s.file) for s in train.shards]
    big = {k: torch.cat([p[k] for p in parts]).repeat(40, *[1] * (parts[0][k].dim() - 1)) for k in parts[0]}
    big = {k: v.contiguous() for k, v in big.items()}
    save_file(big, tmp_path / "big.safetensors")
    registry.add_dataset("digits-big", [tmp_path / "big.safetensors"], train.input.model_dump(), trained=["digits-mlp"])
    return settings.model_copy(update={"registry_dir": root})


def start_worker(settings, name):
    env = subprocess_env(
        settings,
        ATTR_BATCH_SIZE=32,
        ATTR_HEARTBEAT_TTL_S=2,
        ATTR_MAINTENANCE_INTERVAL_S=1,
        ATTR_WARM_ON_START="false",
        ATTR_PROGRESS_INTERVAL_S=0.1,
    )
    return subprocess.Popen(
        [PYTHON, "-m", "worker", "--name", name],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(predicate, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture
def api(big_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(big_settings)) as c:
        yield c


def submit(api):
    body = {
        "model": "digits-mlp",
        "dataset": "digits-big",
        "test": {"dataset": "digits-test", "indices": list(range(16))},
        "method": {"mode": "finite", "optimizer": "adam", "precondition": "none"},
    }
    response = api.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    return response.json()["links"]["self"]


def running_mid_job(api, url):
    job = api.get(url).json()
    return job if job["status"] == "running" and 0 < job["progress"]["done"] < (job["progress"]["total"] or 0) else None


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
        assert response.status_code == 202
        job = wait_for(lambda: (j := api.get(url).json())["status"] == "canceled" and j, timeout=30)
        assert job["progress"]["done"] < job["progress"]["total"]
        assert worker.poll() is None  # the worker stays up for the next job
        record = RQJob.fetch(job["id"], connection=redis_lib.Redis.from_url(big_settings.redis_url))
        assert record.get_status() == JobStatus.STOPPED  # RQ's own state, through RQ's stop-job command
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_long_poll_returns_as_soon_as_the_job_ends(api, big_settings):
    worker = start_worker(big_settings, "poller")
    try:
        wait_for(lambda: api.get("/readyz").status_code == 200)
        url = submit(api)
        start = time.monotonic()
        done = api.get(url, params={"wait_s": 25}).json()  # one request, held until the end is published
        elapsed = time.monotonic() - start
    finally:
        worker.terminate()
        worker.wait(10)
    assert done["status"] == "finished", done
    assert elapsed < 20 and done["timing"]["sweep_s"] < elapsed  # it waited for the job, not for the deadline
