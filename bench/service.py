"""Service latency on loopback, measured side by side in one run.

    python -m bench.service [--requests 500] [--tile 100] [--polls 200] [--compare PATH]

Starts a private redis-server, a demo registry (plus `digits-big`: the training set tiled `--tile`
times), the API under uvicorn and one worker, then reports:
  - GET of a finished job, cache-hit POST and the report page: p50/p99 over `--requests` requests each
    (keep-alive client);
  - `--polls` concurrent long polls (`wait_s=20`) on one running job: errors, how they ended, the API
    process's CPU use while they waited, and /healthz latency meanwhile;
  - warm end-to-end latency of one attribution (POST, then a long-poll GET) divided by the
    engine's own compute time for the same work in this process (mirror + sweep on warm data);
  - cold first request (a fresh worker without warm-up: model and shard loads, torch.func's first call)
    against the same request warm.
`--compare PATH` runs the latency and long-poll measures against the service code in another checkout
(e.g. `git worktree add /tmp/old <commit>`) too, in the same run, for an old-vs-new table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import torch
from safetensors.torch import load_file, save_file

from contract.registry import Registry
from worker.registry import main as registry_main

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@contextlib.contextmanager
def service(registry_dir: Path, warm: bool, code: Path = ROOT, **settings: str):
    """Redis, the API under uvicorn and one worker on free ports, running the code in `code`; yields an
    httpx client once ready (`client.api_pid`: the API's process). `settings`: extra ATTR_* environment
    variables (e.g. ATTR_MAX_TEST_POINTS="512")."""
    redis_port, api_port = free_port(), free_port()
    binary = subprocess.run(
        [str(ROOT / "scripts" / "redis")], capture_output=True, text=True, check=True
    ).stdout.strip()
    procs = [
        subprocess.Popen(
            [binary, "--port", str(redis_port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
    ]
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ATTR_REGISTRY_DIR": str(registry_dir),
        "ATTR_WARM_ON_START": str(warm).lower(),
        "ATTR_PROGRESS_INTERVAL_S": "0.5",
        "ATTR_BATCH_SIZE": "4096",
        **settings,
    }
    try:
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                redis.Redis(port=redis_port).ping()
                break
            time.sleep(0.05)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app.main:create_app",
                    "--factory",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                cwd=code,
                env={**env, "PYTHONPATH": str(code)},
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "worker"],
                cwd=code,
                env={**env, "PYTHONPATH": str(code)},
                stderr=subprocess.DEVNULL,
            )
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
        client.api_pid = procs[1].pid
        for _ in range(3000):  # the worker's warm-up computes the demo models' curvature first
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    break
            time.sleep(0.1)
        yield client
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_to_end(client: httpx.Client, body: dict, path: str = "/v1/attributions") -> tuple[float, dict]:
    start = time.perf_counter()
    job = client.post(path, json=body).json()
    while job["status"] in ("queued", "running"):
        job = client.get(job["links"]["self"], params={"wait_s": 10}).json()  # long poll
    assert job["status"] == "finished", job
    return time.perf_counter() - start, job


def engine_time(registry_dir: Path, dataset: str, indices: list[int], repeats: int = 5) -> float:
    """The engine alone on the same work, warm: mirror + sweep over the registered shards."""
    from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

    registry = Registry(registry_dir)
    m, d = registry.model("digits-mlp"), registry.dataset(dataset)
    model = build(m.architecture, m.params)
    model.load_state_dict(load_file(m.path / m.weights))
    shards = [dict(load_file(d.path / s.file).items()) for s in d.shards]
    test = load_file(registry.dataset("digits-test").path / "shard-000.safetensors")
    test = (test["inputs"][indices], test["targets"][indices])
    fi = ForwardInf(model, Classification(), MirrorConfig(batch_size=4096))
    bases = [fi.prepare((s["inputs"], s["targets"])).base for s in shards]

    def once():
        mirror = fi.mirror(test)
        for s, base in zip(shards, bases, strict=True):
            fi.prepare((s["inputs"], s["targets"]), base=base)
            fi.sweep(mirror)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(client: httpx.Client, body: dict, requests: int) -> list[tuple[str, float]]:
    """p50/p99 of GET on a finished job, of a cache-hit POST and of its report page."""
    _, job = run_to_end(client, body)
    times: dict[str, list[float]] = {"GET finished job": [], "cache-hit POST": [], "report page": []}
    for _ in range(requests):
        for name, call in (
            ("GET finished job", lambda: client.get(job["links"]["self"])),
            ("cache-hit POST", lambda: client.post("/v1/attributions", json=body)),
            ("report page", lambda: client.get(job["links"]["report"])),
        ):
            start = time.perf_counter()
            assert call().status_code == 200
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, values in times.items():
        rows.append((f"{name} p50, ms", 1000 * percentile(values, 0.5)))
        rows.append((f"{name} p99, ms", 1000 * percentile(values, 0.99)))
    return rows


def long_polls(client: httpx.Client, body: dict, polls: int, wait_s: float = 20.0) -> list[tuple[str, float | str]]:
    """`polls` concurrent long polls on one running job: errors, how they ended, the API's CPU while they
    were held (from all in until the job's end) and while they were answered, /healthz meanwhile."""
    url = client.post("/v1/attributions", json=body).json()["links"]["self"]
    while client.get(url).json()["status"] != "running":
        time.sleep(0.05)

    async def run():
        limits = httpx.Limits(max_connections=polls + 10, max_keepalive_connections=polls + 10)
        async with httpx.AsyncClient(base_url=str(client.base_url), limits=limits, timeout=wait_s + 60) as ac:

            async def poll():
                try:
                    r = await ac.get(url, params={"wait_s": wait_s})
                    return r.status_code, r.json()["status"], time.perf_counter()
                except httpx.HTTPError as exc:
                    return type(exc).__name__, None, time.perf_counter()

            async def health(until):
                while not until.done():
                    start = time.perf_counter()
                    await ac.get("/healthz")
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.25)

            latencies: list[float] = []
            tasks = [asyncio.create_task(poll()) for _ in range(polls)]
            await asyncio.sleep(2.0)  # every poll is in and waiting
            held = (time.perf_counter(), cpu_seconds(client.api_pid))
            everything = asyncio.gather(*tasks)
            probe = asyncio.create_task(health(everything))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            woken = (time.perf_counter(), cpu_seconds(client.api_pid))
            results = await everything
            await probe
            done = (time.perf_counter(), cpu_seconds(client.api_pid))
            return results, latencies, held, woken, done

    results, health, held, woken, done = asyncio.run(run())
    ends = sorted(end - woken[0] for *_, end in results)
    statuses = sorted({str(status) for _, status, _ in results})

    def core(a, b):
        return 100 * (b[1] - a[1]) / max(b[0] - a[0], 1e-9)

    return [
        (f"{polls} long polls: non-200 answers", float(sum(code != 200 for code, *_ in results))),
        (f"{polls} long polls: statuses returned", ", ".join(statuses)),
        (f"{polls} long polls: held for, s", woken[0] - held[0]),
        (f"{polls} long polls: API CPU while held, % of a core", core(held, woken)),
        (f"{polls} long polls: all answered within, s of the job's end", ends[-1]),
        (f"{polls} long polls: API CPU while answering, % of a core", core(woken, done)),
        (
            f"{polls} long polls: /healthz meanwhile p50 / max, ms",
            f"{1000 * percentile(health, 0.5):.1f} / {1000 * max(health):.1f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tile", type=int, default=100)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, measured in the same run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "registry"
        registry_main(["--root", str(root), "demo"])
        registry = Registry(root)
        train = registry.dataset("digits-train")
        parts = [load_file(train.path / s.file) for s in train.shards]
        big = {
            k: torch.cat([p[k] for p in parts]).repeat(args.tile, *[1] * (parts[0][k].dim() - 1)).contiguous()
            for k in parts[0]
        }
        save_file(big, Path(tmp) / "big.safetensors")
        registry.add_dataset(
            "digits-big", [Path(tmp) / "big.safetensors"], train.input.model_dump(), trained=["digits-mlp"]
        )

        body = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]}}
        report = {**body, "test": {"dataset": "digits-test", "indices": [3, 4, 5]}, "method": {"precondition": "none"}}
        slow = {  # a job that runs for several seconds, to hold long polls on
            "model": "digits-mlp",
            "dataset": "digits-big",
            "test": {"dataset": "digits-test", "indices": list(range(64))},
            "method": {"mode": "finite", "optimizer": "adam", "precondition": "none"},
        }
        columns: dict[str, list[tuple[str, float | str]]] = {}
        for name, code in [("this checkout", ROOT)] + ([("compared", args.compare)] if args.compare else []):
            with service(root, warm=False, code=code, ATTR_BATCH_SIZE="256") as client:
                columns[name] = latency(client, report, args.requests) + long_polls(client, slow, args.polls)

        rows = []
        with service(root, warm=False) as client:
            cold, _ = run_to_end(client, {**body, "test": {"dataset": "digits-test", "indices": [1]}})
            warm_small, job = run_to_end(client, {**body, "test": {"dataset": "digits-test", "indices": [2]}})
            rows.append(("cold first request (demo, 1,437 records), s", cold))
            rows.append(("same request warm, s", warm_small))
            rows.append(("cold / warm", cold / warm_small))
            for dataset, n in (("digits-train", train.size), ("digits-big", train.size * args.tile)):
                e2e = statistics.median(
                    run_to_end(
                        client,
                        {
                            "model": "digits-mlp",
                            "dataset": dataset,
                            "test": {"dataset": "digits-test", "indices": [10 + i, 11 + i]},
                        },
                    )[0]
                    for i in range(0, 10, 2)
                )
                engine = engine_time(root, dataset, [10, 11])
                rows.append((f"warm end-to-end / engine, {dataset} ({n:,} records, k=2)", e2e / engine))
                rows.append(("  end-to-end s / engine s", f"{e2e:.4f} / {engine:.4f}"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else value

    names = list(columns)
    print(f"| measure | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    for i, (measure, _) in enumerate(columns[names[0]]):
        print(f"| {measure} | {' | '.join(cell(columns[n][i][1]) for n in names)} |")
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {cell(value)} |")


if __name__ == "__main__":
    main()
