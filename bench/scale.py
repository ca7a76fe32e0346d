"""Scaling over the training set's size and over workers, through the real registry, HTTP and RQ.

    python -m bench.scale [--sizes 1e5,1e6,1e7] [--quick] [--out bench/out/scale.json]
        [--warm-mb 512[,0]] [--methods finite,default] [--ks 1,16] [--size-workers 1[,2]] [--no-workers]

Synthetic data on disk (64-d Gaussian inputs, labels from a random linear teacher) registered in shards of
`--shard` records; an MLP 64-64-10 and a CNN (two 3x3 convolutions, width 16, on the inputs as 1x8x8
images) trained on 100k of them for a few seconds. For each size, a fresh redis-server, the API and
`--size-workers` workers (each `ATTR_TORCH_THREADS=1`, a warm budget of `--warm-mb`), then one request per
setting:
  - wall time from POST to the finished result (long polls), training records scored per second;
  - peak RSS of each worker process (VmHWM) and Redis' peak memory;
  - per training record, the request's time over plain `no_grad` inference (forward + loss) of the same
    model on the same records held in memory, on one thread in this process, measured just before the
    request (for the MLP at k = 1: the median of three such pairs): what the service and Forward-INF add.
Settings: `finite` (the paper's: one Adam step, the perturbed losses read by forward passes) and the
service's default (the attribution preset: exact first-order scores along a curvature-preconditioned
step, forward-mode), at k = 1 and 16 test points (not the CNN's default at 16: SKIP), each after one
request that pays the one-off setup ("first s"). Then throughput with 1 and 2 workers on the same work
(a multi-part training set; each worker one thread), measured in the same run.
Results print as markdown tables and go to `--out` as JSON; docs/scaling.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import torch
from safetensors.torch import load_file, save_file

from bench.service import free_port
from contract.registry import Registry
from worker.forward_inf import Classification, build

ROOT = Path(__file__).resolve().parents[1]
DIM, CLASSES = 64, 10
MODELS = {
    "mlp": ("builtin:mlp", {"in_features": DIM, "out_features": CLASSES, "hidden": [64]}, [DIM]),
    "cnn": ("builtin:cnn", {"in_channels": 1, "num_classes": CLASSES, "width": 16, "image_size": 8}, [1, 8, 8]),
}
METHODS = {"finite": {"mode": "finite", "optimizer": "adam", "precondition": "none"}, "default": {}}
# the CNN's forward-mode sweep of 16 test points over 1e6 records: ~16 x 2.5 x 45 s on one thread (~30 min)
SKIP = {("cnn", "default", 16)}


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    teacher = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(0))
    return x, (x @ teacher).argmax(1)


def train(name: str) -> torch.nn.Module:
    arch, params, shape = MODELS[name]
    model = build(arch, params)
    x, y = synthetic(100_000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for lo in range(0, len(x), 256):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[lo : lo + 256].reshape(-1, *shape)), y[lo : lo + 256]).backward()
        opt.step()
    return model.eval()


def build_registry(root: Path, sizes: list[int], shard: int, tmp: Path) -> None:
    registry = Registry(root)
    for name, (arch, params, shape) in MODELS.items():
        save_file(train(name).state_dict(), tmp / f"{name}.safetensors")
        spec = {"shape": shape, "num_classes": CLASSES}
        registry.add_model(f"synth-{name}", "classification", arch, tmp / f"{name}.safetensors", spec, params)
    x, y = synthetic(1000, seed=2)
    for name, (_, _, shape) in MODELS.items():
        save_file({"inputs": x.reshape(-1, *shape).contiguous(), "targets": y}, tmp / "test.safetensors")
        registry.add_dataset(f"synth-test-{name}", [tmp / "test.safetensors"], {"shape": shape, "num_classes": CLASSES})
    for n in sizes:
        for name in ("mlp", "cnn") if n == 10**6 else ("mlp",):
            shape = MODELS[name][2]
            files = []
            for s, lo in enumerate(range(0, n, shard)):
                x, y = synthetic(min(shard, n - lo), seed=1000 + s)
                files.append(tmp / f"{name}-{n}-{s}.safetensors")
                save_file({"inputs": x.reshape(-1, *shape).contiguous(), "targets": y}, files[-1])
            spec = {"shape": shape, "num_classes": CLASSES}
            registry.add_dataset(f"synth-{name}-{n}", files, spec, trained=[f"synth-{name}"])
            for f in files:
                f.unlink()


@contextlib.contextmanager
def service(root: Path, workers: int, env_extra: dict[str, str]):
    """A fresh redis-server, the API and `workers` worker processes (one torch thread each)."""
    redis_port, api_port = free_port(), free_port()
    binary = subprocess.run(
        [str(ROOT / "scripts" / "redis")], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ATTR_REGISTRY_DIR": str(root),
        "ATTR_SCORE_DIR": str(root.parent / "scores"),
        "ATTR_WARM_ON_START": "false",
        "ATTR_TORCH_THREADS": "1",
        "ATTR_MAX_TEST_POINTS": "256",
        "PYTHONPATH": str(ROOT),
        **env_extra,
    }
    procs = [
        subprocess.Popen(
            [binary, "--port", str(redis_port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
    ]
    try:
        client = redis.Redis(port=redis_port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.05)
        api = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(api_port)]
        procs.append(subprocess.Popen([*api, "--log-level", "warning"], cwd=ROOT, env=env))
        pool = [
            subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        procs += pool
        http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if http.get("/readyz").status_code == 200 and len(list(client.scan_iter("fi:worker:*"))) == workers:
                    break
            time.sleep(0.1)
        time.sleep(2)  # every worker has seen the others (its share of the affinity queues)
        yield http, client, pool
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def request(name: str, dataset: str, method: dict, k: int, fresh) -> dict:
    test = {"dataset": f"synth-test-{name}", "indices": [next(fresh) for _ in range(k)]}
    return {"model": f"synth-{name}", "dataset": dataset, "test": test, "method": method}


def run(http: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    job = http.post("/v1/attributions", json=body).json()
    while job["status"] in ("queued", "running"):
        job = http.get(job["links"]["self"], params={"wait_s": 30}).json()
    assert job["status"] == "finished", job
    return time.perf_counter() - start


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def inference_s(root: Path, model_name: str, dataset: str, batch: int) -> float:
    """no_grad forward + loss over every record (read into memory first, untimed), on one thread: the
    least a pass over the training set can cost."""
    registry = Registry(root)
    m, d = registry.model(f"synth-{model_name}"), registry.dataset(dataset)
    model = build(m.architecture, m.params)
    model.load_state_dict(load_file(m.path / m.weights))
    model.eval()
    data = [{k: torch.from_numpy(v) for k, v in d.rows(n).items()} for n in range(len(d.shards))]
    task, threads = Classification(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            for shard in data:
                for lo in range(0, len(shard["inputs"]), batch):
                    out = model(shard["inputs"][lo : lo + batch])
                    task.criterion(out, {"targets": shard["targets"][lo : lo + batch]})
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--quick", action="store_true", help="sizes 1e5 and 1e6 only")
    parser.add_argument("--workers-only", action="store_true", help="only 1 vs 2 workers (on 1e6 records)")
    parser.add_argument("--shard", type=int, default=250_000, help="records per shard (and per shard job)")
    parser.add_argument("--warm-mb", default="512", help="each worker's warm budget; several (a,b): side by side; "
                        "0: the service's default (a share of free memory)")  # fmt: skip
    parser.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    parser.add_argument("--ks", default="1,16", help="test points per request")
    parser.add_argument("--no-workers", action="store_true", help="skip 1 vs 2 workers")
    parser.add_argument("--size-workers", default="1", help="workers serving the size rows; several (1,2): each")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale.json")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    sizes = [s for s in sizes if s <= 10**6] if args.quick else sizes
    sizes = [10**6] if args.workers_only else sizes
    env = {"ATTR_BATCH_SIZE": str(args.batch), "ATTR_PART_RECORDS": str(args.shard)}
    budgets = [int(mb) for mb in args.warm_mb.split(",")]
    methods, ks = args.methods.split(","), [int(k) for k in args.ks.split(",")]

    def budget(mb: int) -> dict[str, str]:
        return {"ATTR_WARM_BYTES": str(mb << 20)} if mb else {}

    rows, scaling, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "var" if (ROOT / "var").is_dir() else None) as tmp:
        root, tmp = Path(tmp) / "registry", Path(tmp)
        t = time.perf_counter()
        build_registry(root, sizes, args.shard, tmp)
        print(f"registry built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        fresh = itertools.count()  # test point indices: every request is new (no cache hit)
        size_workers = [int(w) for w in args.size_workers.split(",")]
        runs = [] if args.workers_only else itertools.product(sizes, budgets, size_workers)
        for n, mb, workers in runs:
            for name in ("mlp", "cnn") if n == 10**6 else ("mlp",):
                dataset = f"synth-{name}-{n}"
                with service(root, workers, env | budget(mb)) as (http, client, pool):
                    for method in methods:
                        settings = METHODS[method]
                        first = run(http, request(name, dataset, settings, 1, fresh))  # the one-off setup
                        for k in ks:
                            if (name, method, k) in SKIP:
                                continue
                            # (inference, request) pairs back to back: this machine's speed drifts by a third
                            pairs = []
                            for _ in range(3 if (name, k) == ("mlp", 1) else 1):
                                base = inference_s(root, name, dataset, args.batch)
                                pairs.append((base, run(http, request(name, dataset, settings, k, fresh))))
                            base, wall = sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]  # the median ratio
                            rows.append(
                                {
                                    "model": name,
                                    "records": n,
                                    "warm_mb": mb or "default",
                                    "workers": workers,
                                    "parts": -(-n // args.shard),
                                    "method": method,
                                    "k": k,
                                    "first_s": round(first, 2),
                                    "wall_s": round(wall, 2),
                                    "records_per_s": round(n / wall),
                                    "over_inference": round(wall / base, 2),
                                    "inference_s": round(base, 2),
                                    "worker_peak_rss_mb": round(peak_rss_mb(pool[0].pid)),
                                    "redis_peak_mb": round(client.info("memory")["used_memory_peak"] / 2**20, 1),
                                }
                            )
                            print(json.dumps(rows[-1]), file=sys.stderr)
        # 1 vs 2 workers on the same multi-part work (each worker one thread): the largest size up to 1e6
        n = max((s for s in sizes if s <= 10**6), default=None)
        for workers in () if args.no_workers or n is None else (1, 2):
            with service(root, workers, env | budget(budgets[0])) as (http, _, _):
                run(http, request("mlp", f"synth-mlp-{n}", METHODS["finite"], 16, fresh))  # base losses, warm shards
                times = [run(http, request("mlp", f"synth-mlp-{n}", METHODS["finite"], 16, fresh)) for _ in range(3)]
                scaling[workers] = sorted(times)[1]  # the median of three
    result = {"rows": rows, "workers": {str(w): round(s, 2) for w, s in scaling.items()}}
    if scaling:
        result["speedup"] = round(scaling[1] / scaling[2], 2)
    result["machine"] = (
        f"torch {torch.__version__}, {os.cpu_count()} cores; bench {time.perf_counter() - started:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['machine']}\n")
    print(
        "| model | records | parts | workers | warm MB | method | k | first s | wall s | records/s | x inference "
        "| worker peak RSS MB | Redis peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['records']:,} | {r['parts']} | {r['workers']} | {r['warm_mb']} | {r['method']} | {r['k']} "
            f"| {r['first_s']} | {r['wall_s']} | "
            f"{r['records_per_s']:,} | {r['over_inference']} | {r['worker_peak_rss_mb']} | {r['redis_peak_mb']} |"
        )
    if scaling:
        print(f"\n1 worker {scaling[1]:.2f} s, 2 workers {scaling[2]:.2f} s on {n:,} records (k=16, finite): "
              f"{result['speedup']}x")  # fmt: skip


if __name__ == "__main__":
    main()
