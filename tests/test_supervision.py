"""Processes that stay up, and stop when asked: a worker rides out a Redis outage mid-job, scripts/serve
restarts a SIGKILLed worker and the job in flight still finishes, /readyz forgets a dead worker within
seconds, 200 held long polls leave /healthz fast, and a SIGTERM stops an idle worker wherever it lands.
Real redis-server, real `python -m worker`, uvicorn and scripts/serve."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import httpx
import pytest
import redis as redis_lib

from tests.conftest import (
    PYTHON,
    ROOT,
    RedisServer,
    free_port,
    running_mid_job,
    start_worker,
    submit,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.slow


def worker_pids(settings) -> set[int]:
    """The pids of the workers whose readiness heartbeat (named host-pid) has not expired."""
    redis = redis_lib.Redis.from_url(settings.redis_url)
    return {int(k.decode().rsplit("-", 1)[1]) for k in redis.scan_iter(settings.key("worker", "*"))}


def worker_pid(settings) -> int:
    """The pid of the one live worker."""
    pids = worker_pids(settings)
    assert len(pids) == 1, pids
    return pids.pop()


def test_a_worker_rides_out_a_redis_outage_mid_job(big_settings, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    server = RedisServer(tmp_path, durable=True)
    server.start()
    settings = big_settings.model_copy(update={"redis_url": server.url, "heartbeat_ttl_s": 10})
    worker = start_worker(settings, "steady")
    try:
        with TestClient(create_app(settings)) as api:
            url = submit(api)
            wait_for(lambda: running_mid_job(api, url))
            server.stop()
            time.sleep(2)
            server.start()
            done = wait_for(lambda: (j := _json(api, url)) and j["status"] in ("finished", "failed") and j, timeout=90)
        assert done["status"] == "finished", done
        assert worker.poll() is None  # still up: it retried, it did not quit
    finally:
        worker.kill()
        server.stop()


def _json(api, url) -> dict | None:
    response = api.get(url)
    return response.json() if response.status_code == 200 else None  # a 503 while Redis comes back


def test_a_sigterm_stops_an_idle_worker_even_inside_a_broad_except(settings):
    """RQ raised StopRequested from the signal handler; where the main thread was inside an `except
    Exception` (logging's emit, in a CI run) that swallowed it and the worker never stopped."""
    from worker.__main__ import WarmWorker

    class Swallowing(WarmWorker):
        def run_maintenance_tasks(self):
            try:
                if self.last_cleaned_at is None:  # once (a second SIGTERM is RQ's cold shutdown)
                    os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the try
                    time.sleep(0.2)
            except Exception:  # noqa: BLE001 - what logging's emit does with an exception
                pass
            super().run_maintenance_tasks()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = Swallowing(settings, name="swallowing")
        start = time.monotonic()
        worker.work(max_idle_time=20)  # not burst: it waits on its queues until stopped (or idle 20 s)
        assert time.monotonic() - start < settings.steal_after_s + 5
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_readyz_forgets_a_dead_worker_within_seconds(api, big_settings):
    worker = start_worker(big_settings.model_copy(update={"ready_ttl_s": 2}), "mortal")
    try:
        wait_for(lambda: api.get("/readyz").status_code == 200)
        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: api.get("/readyz").status_code == 503, timeout=10)
        assert time.monotonic() - killed < big_settings.ready_ttl_s + 1
    finally:
        worker.kill()


def test_serve_restarts_a_killed_worker_and_the_job_in_flight_finishes(big_settings, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "VENV": str(ROOT / ".venv") if (ROOT / ".venv").is_dir() else os.path.dirname(os.path.dirname(PYTHON)),
        "PORT": str(port),
        "REDIS_URL": big_settings.redis_url,
        "ATTR_REGISTRY_DIR": str(big_settings.registry_dir),
        "ATTR_WORKERS": "1",
        "ATTR_WARM_ON_START": "false",
        "ATTR_BATCH_SIZE": "32",
        "ATTR_HEARTBEAT_TTL_S": "2",
        "ATTR_MAINTENANCE_INTERVAL_S": "1",
        "ATTR_PROGRESS_INTERVAL_S": "0.1",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    serve = subprocess.Popen(
        [ROOT / "scripts" / "serve"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        wait_for(lambda: _ready(api), timeout=120, interval=0.2)
        url = submit(api)
        wait_for(lambda: running_mid_job(api, url))
        victim = worker_pid(big_settings)
        os.kill(victim, signal.SIGKILL)
        done = wait_for(lambda: (j := api.get(url).json())["status"] == "finished" and j, timeout=60, interval=0.2)
        assert len(done["result"]["rows"]) == 16
        # a new worker, started by serve, finished it (the killed one's heartbeat lives out its 2 s TTL)
        survivors = wait_for(lambda: victim not in (pids := worker_pids(big_settings)) and pids, timeout=10)
        assert len(survivors) == 1, survivors
        counted = re.findall(
            r'attr_http_requests_total\{method="GET",route="/readyz",status="\d+"\} (\S+)', api.get("/metrics").text
        )
        assert sum(float(n) for n in counted) >= 1  # /metrics sums serve's 2 API processes (multiprocess mode)
    finally:
        serve.terminate()
        serve.wait(30)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # serve stopped what it started


def _ready(api: httpx.Client) -> bool:
    try:
        return api.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_200_held_long_polls_leave_healthz_fast(settings):
    """No worker: the job stays queued, so every long poll is held for its whole wait."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": settings.redis_url, "ATTR_REGISTRY_DIR": str(settings.registry_dir)}
    api = subprocess.Popen(
        [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready_or_503(base), timeout=30, interval=0.1)
        body = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]}}
        url = httpx.post(f"{base}/v1/attributions", json=body).json()["links"]["self"]

        async def run():
            limits = httpx.Limits(max_connections=220, max_keepalive_connections=220)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
                polls = [asyncio.create_task(client.get(url, params={"wait_s": 6})) for _ in range(200)]
                await asyncio.sleep(2)  # all of them in, and held
                health = []
                for _ in range(20):
                    start = time.perf_counter()
                    assert (await client.get("/healthz")).status_code == 200
                    health.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)
                answers = await asyncio.gather(*polls)
                return health, answers

        health, answers = asyncio.run(run())
    finally:
        api.terminate()
        api.wait(10)
    assert all(a.status_code == 200 and a.json()["status"] == "queued" for a in answers), {
        (a.status_code, a.text[:200]) for a in answers
    }
    print(
        f"\n/healthz with 200 long polls held: p50 {1000 * sorted(health)[10]:.1f} ms, max {1000 * max(health):.1f} ms"
    )
    assert max(health) < 2  # answered at once, not after the polls' 6 s: they hold no thread or loop


def _ready_or_503(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


CYCLES = """
from fastapi.testclient import TestClient
from app.main import create_app
from contract.settings import Settings
settings = Settings()  # from the environment: the test's Redis and registry
for i in range(300):
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.post("/v1/attributions", json={"model": "x"})
        if i % 2:
            client.get("/v1/attributions/unknown")
"""


def test_the_api_always_shuts_down(settings):
    """300 start/stop cycles of the app against a live Redis, each stopping its job-event subscription:
    redis-py once swallowed the cancel in about one stop of 500, and the shutdown then waited forever."""
    run = subprocess.run(
        [PYTHON, "-W", "ignore", "-c", CYCLES], cwd=ROOT, env=subprocess_env(settings), timeout=120, capture_output=True
    )
    assert run.returncode == 0, run.stderr[-2000:]


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (by parent, whatever session or group it moved to)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies have exited
                    out.add(pid)
        except OSError:
            pass
    return out


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def serve_env(settings, port: int, **extra) -> dict:
    """scripts/serve on the test's registry, with its own private Redis (no REDIS_URL)."""
    env = {**os.environ, "VENV": os.path.dirname(os.path.dirname(PYTHON)), "PORT": str(port),
           "ATTR_REGISTRY_DIR": str(settings.registry_dir), "ATTR_SCORE_DIR": str(settings.score_dir),
           "ATTR_WORKERS": "1", "ATTR_API_PROCESSES": "2", **extra}  # fmt: skip
    for name in ("PYTEST_CURRENT_TEST", "REDIS_URL", "ATTR_REDIS_URL"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize(
    "sig, when",
    [
        (signal.SIGINT, "ready"),
        (signal.SIGTERM, "ready"),
        (signal.SIGTERM, "warming up"),
        (signal.SIGINT, "redis first"),
    ],
)
def test_a_signal_to_serves_group_ends_every_process(settings, sig, when):
    """What a terminal's Ctrl-C or docker's stop sends: the signal to serve's whole process group. Every
    process it started ends (they outlived it by minutes when Redis stopped first)."""
    port = free_port()
    env = serve_env(settings, port, ATTR_WARM_ON_START="true" if when == "warming up" else "false")
    serve = subprocess.Popen([ROOT / "scripts" / "serve"], cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        if when == "warming up":  # the worker and the API have started; the worker is not ready yet

            def started_all() -> bool:
                commands = [command(p) for p in descendants(serve.pid)]
                return any(" -m worker" in c for c in commands) and any("uvicorn" in c for c in commands)

            wait_for(started_all, timeout=120)
        else:
            wait_for(lambda: _ready(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)), timeout=120)
        started = descendants(serve.pid)
        assert any("redis-server" in command(p) for p in started) and any("uvicorn" in command(p) for p in started)
        if when == "redis first":
            (redis_pid,) = [p for p in started if "redis-server" in command(p)]
            os.kill(redis_pid, signal.SIGKILL)
            time.sleep(0.5)
        signalled = time.monotonic()
        os.killpg(serve.pid, sig)
        wait_for(lambda: not alive(started | {serve.pid}), timeout=60, interval=0.1)
        print(f"\n{sig.name} ({when}): every process ended {time.monotonic() - signalled:.1f} s after the signal")
    finally:
        for pid in alive(descendants(serve.pid) | {serve.pid}):
            os.kill(pid, signal.SIGKILL)


def test_serve_recovers_when_the_api_master_is_killed(settings):
    """A SIGKILLed uvicorn master left its workers serving the port, and serve looped on 'Address already in
    use': now the master's process group goes with it and the API is back."""
    port = free_port()
    serve = subprocess.Popen([ROOT / "scripts" / "serve"], cwd=ROOT, env=serve_env(settings, port, ATTR_WARM_ON_START="false"),
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:
        wait_for(lambda: _ready(api), timeout=120)
        masters = [p for p in descendants(serve.pid) if "uvicorn" in command(p) and os.getpgid(p) == p]
        assert len(masters) == 1, masters
        children = descendants(masters[0])
        os.kill(masters[0], signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not alive(children), timeout=30, interval=0.1)  # its workers went with it
        wait_for(lambda: _ready(api), timeout=60, interval=0.1)
        restarted = [p for p in descendants(serve.pid) if "uvicorn" in command(p) and os.getpgid(p) == p]
        assert restarted and restarted != masters
        print(f"\nthe API answered again {time.monotonic() - killed:.1f} s after its master was killed")
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        wait_for(lambda: not alive(descendants(serve.pid) | {serve.pid}), timeout=60, interval=0.1)
