"""Service latency on loopback, measured side by side in one run.

    python -m bench.service [--requests 500] [--tile 100]

Starts a private redis-server, a demo registry (plus `digits-big`: the training set tiled `--tile`
times), the API under uvicorn and one worker, then reports:
  - cached GET and cache-hit POST latency, p50/p99 over `--requests` requests (keep-alive client);
  - warm end-to-end latency of one attribution (POST, then a long-poll GET) divided by the
    engine's own compute time for the same work in this process (mirror + sweep on warm data);
  - cold first request (a fresh worker without warm-up: model and shard loads, torch.func's first call)
    against the same request warm.
"""

from __future__ import annotations

import argparse
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

from worker.registry import Registry
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
def service(registry_dir: Path, warm: bool, **settings: str):
    """Redis, the API under uvicorn and one worker on free ports; yields an httpx client once ready.
    `settings`: extra ATTR_* environment variables (e.g. ATTR_MAX_TEST_POINTS="512")."""
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
                cwd=ROOT,
                env=env,
            )
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
        for _ in range(3000):  # the worker's warm-up computes the demo models' curvature first
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    break
            time.sleep(0.1)
        yield client
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tile", type=int, default=100)
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
        rows = []
        with service(root, warm=False) as client:
            cold, _ = run_to_end(client, {**body, "test": {"dataset": "digits-test", "indices": [1]}})
            warm_small, job = run_to_end(client, {**body, "test": {"dataset": "digits-test", "indices": [2]}})
            rows.append(("cold first request (demo, 1,437 records), s", cold))
            rows.append(("same request warm, s", warm_small))
            rows.append(("cold / warm", cold / warm_small))

            get_times, post_times = [], []
            for _ in range(args.requests):
                start = time.perf_counter()
                assert client.get(job["links"]["self"]).status_code == 200
                get_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert (
                    client.post(
                        "/v1/attributions", json={**body, "test": {"dataset": "digits-test", "indices": [2]}}
                    ).status_code
                    == 200
                )
                post_times.append(time.perf_counter() - start)
            for name, values in (("cached GET", get_times), ("cache-hit POST", post_times)):
                rows.append((f"{name} p50, ms", 1000 * percentile(values, 0.5)))
                rows.append((f"{name} p99, ms", 1000 * percentile(values, 0.99)))

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
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    main()
