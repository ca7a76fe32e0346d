"""Service latency on loopback, measured side by side in one run.

    python -m bench.service [--requests 500] [--tile 100] [--polls 200] [--seconds 5] [--compare PATH]

Starts a private redis-server, a demo registry (plus `digits-big`: the training set tiled `--tile`
times), the API under uvicorn and one worker, then reports:
  - GET of a finished job, cache-hit POST and the report page: p50/p99 over `--requests` requests each
    (keep-alive client);
  - `--polls` concurrent long polls (`wait_s=20`) on one running job: errors, how they ended, the API
    process's CPU use while they waited, and /healthz latency meanwhile;
  - throughput of a cached GET and a cache-hit POST at concurrency 1, 8, 32 and 128 (wrk, from Debian's
    `wrk` package: C, so the load costs the two cores little), with 1 and 2 API processes;
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
import io
import json
import os
import re
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

from app.keys import main as keys_main
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
def service(
    registry_dir: Path,
    warm: bool,
    code: Path = ROOT,
    api_workers: int = 1,
    worker_log: Path | None = None,
    **settings: str,
):
    """Redis, the API under uvicorn and one worker on free ports, running the code in `code`; yields an
    httpx client once ready (`client.api_pid`: the API's process, `client.redis_url`). `settings`: extra
    ATTR_* environment variables (e.g. ATTR_MAX_TEST_POINTS="512"); `worker_log`: where its log goes."""
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
                    "--workers",
                    str(api_workers),
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
                stderr=open(worker_log, "w") if worker_log else subprocess.DEVNULL,  # noqa: SIM115 (the child's)
            )
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
        client.api_pid, client.redis_url = procs[1].pid, env["REDIS_URL"]
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


PROBE = """
import sys, time, urllib.request
while True:
    start = time.perf_counter()
    try:
        urllib.request.urlopen(sys.argv[1], timeout=120).read()
    except OSError:
        pass
    print(time.perf_counter() - start, flush=True)
    time.sleep(0.1)
"""


def long_polls(client: httpx.Client, body: dict, polls: int, wait_s: float = 20.0) -> list[tuple[str, float | str]]:
    """`polls` concurrent long polls on one running job: errors, how they ended, the API's CPU while they
    were held (from all in until the job's end) and while they were answered, /healthz meanwhile."""
    url = client.post("/v1/attributions", json=body).json()["links"]["self"]
    while client.get(url).json()["status"] != "running":
        time.sleep(0.05)

    async def run():
        limits = httpx.Limits(max_connections=polls + 10, max_keepalive_connections=polls + 10)
        async with httpx.AsyncClient(
            base_url=str(client.base_url), headers=client.headers, limits=limits, timeout=wait_s + 60
        ) as ac:

            async def poll():
                try:
                    r = await ac.get(url, params={"wait_s": wait_s})
                    return r.status_code, r.json()["status"], time.perf_counter()
                except httpx.HTTPError as exc:
                    return type(exc).__name__, None, time.perf_counter()

            tasks = [asyncio.create_task(poll()) for _ in range(polls)]
            everything = asyncio.gather(*tasks)
            await asyncio.sleep(1.0)  # every poll is in and waiting
            held = (time.perf_counter(), cpu_seconds(client.api_pid))
            # /healthz from another process: this one's event loop is busy reading 200 long answers
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, f"{client.base_url}/healthz"], stdout=subprocess.PIPE
            )
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert time.perf_counter() - held[0] > 1.0, "the job ended too soon to hold the polls: use a larger --tile"
            woken = (time.perf_counter(), cpu_seconds(client.api_pid))
            results = await everything
            done = (time.perf_counter(), cpu_seconds(client.api_pid))
            probe.terminate()
            latencies = [float(line) for line in probe.communicate()[0].split()]
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
            f"{1000 * percentile(health, 0.5):.1f} / {1000 * max(health):.1f}" if health else "no answer",
        ),
    ]


def wrk(url: str, connections: int, seconds: int, headers: dict[str, str], body: dict | None = None) -> dict:
    """wrk (C, from Debian's `wrk` package) against `url`: requests/s, p50/p99 latency in ms, errors."""
    args = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if body is not None:  # a POST with this JSON body
            script.write(f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(body))}\n")
            script.write("wrk.headers['Content-Type'] = 'application/json'\n")
            script.flush()
            args += ["-s", script.name]
        out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(value[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[value[2]]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    return {"rps": rate, "p50": ms("50"), "p99": ms("99"), "errors": errors + (int(non_2xx[1]) if non_2xx else 0)}


def throughput(client: httpx.Client, body: dict, seconds: int, headers: dict[str, str]) -> list[tuple[str, str]]:
    """Cached GET (a finished job's view) and cache-hit POST at concurrency 1, 8, 32, 128."""
    _, job = run_to_end(client, body)
    assert client.post("/v1/attributions", json=body).status_code == 200  # from here on a cache hit
    rows = []
    for name, url, payload in (
        ("cached GET", f"{client.base_url}{job['links']['self']}", None),
        ("cache-hit POST", f"{client.base_url}/v1/attributions", body),
    ):
        for c in (1, 8, 32, 128):
            r = wrk(url, c, seconds, headers, payload)
            rows.append(
                (
                    f"{name}, c={c}: req/s, p50 / p99 ms, errors",
                    f"{r['rps']:.0f}, {r['p50']:.1f} / {r['p99']:.1f}, {r['errors']}",
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tile", type=int, default=100)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, measured in the same run")
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run (throughput at 1, 8, 32, 128)")
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
            "test": {"dataset": "digits-test", "indices": list(range(128))},
            "method": {"mode": "finite", "optimizer": "adam", "precondition": "none"},
        }
        keys = Path(tmp) / "keys.toml"  # this checkout runs as in production: every request with a key
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            keys_main(["--file", str(keys), "create", "--tenant", "bench", "--scopes", "read,submit"])
        auth = {"Authorization": f"Bearer {printed.getvalue().strip()}"}
        own = {"ATTR_API_KEYS_FILE": str(keys), "ATTR_SUBMIT_RATE_PER_MINUTE": str(10**9), "ATTR_BATCH_SIZE": "256"}
        runs = [("this checkout", ROOT, 1), ("this checkout, 2 API processes", ROOT, 2)]
        runs += [("compared", args.compare, 1)] if args.compare else []
        columns: dict[str, dict[str, float | str]] = {}
        for name, code, processes in runs:
            with service(root, warm=False, code=code, api_workers=processes, **own) as client:
                client.headers.update(auth)
                measures = throughput(client, report, args.seconds, auth)
                if processes == 1:  # the long polls' CPU figure reads one API process
                    measures = latency(client, report, args.requests) + long_polls(client, slow, args.polls) + measures
                columns[name] = dict(measures)

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
    for measure in columns[names[0]]:
        print(f"| {measure} | {' | '.join(cell(columns[n].get(measure, '-')) for n in names)} |")
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {cell(value)} |")


if __name__ == "__main__":
    main()
