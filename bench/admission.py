"""Admission by cost and cancel latency on the demo registry (contract/cost.py; worker `kill_horse`).

    python -m bench.admission [--run-s 8] [--long-s 20]

Starts the service (bench.service's: private Redis, uvicorn, one worker with its warm-up, which measures
each demo model's rate; ATTR_TORCH_THREADS=2, the only torch process; ATTR_LONG_JOB_S=--long-s) and
reports, for the issue's expensive request (leakage on the tiny text model with one sentence, here with
256 calibration records) and a cheap one (attribution of one digits test point):
  - the estimate and queue chosen at POST (before anything ran), the job's own ETA after `--run-s`
    seconds of running (its progress), and the seconds per batch;
  - a cancel while it runs: seconds from DELETE to RQ's STOPPED, and whether the worker interrupted a
    batch (its log).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import redis
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from bench.service import service
from worker.registry import main as registry_main

TEXT = {
    "model": "facts-gpt",
    "dataset": "facts-corpus",
    "test": {"texts": [{"prompt": "The capital of Zorland is", "completion": " Quenbridge."}]},
    "calibration_records": 256,  # 257 rows: long enough to cancel mid-run
}
DIGITS = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]}}


def measure(client, path: str, body: dict, run_s: float, rq: redis.Redis) -> dict:
    posted = time.perf_counter()
    job = client.post(path, json=body)
    assert job.status_code == 202, job.text
    job = job.json()
    row = {"request": path.rsplit("/", 1)[-1], "model": body["model"], "admission": job["admission"]}
    while (view := client.get(job["links"]["self"]).json())["status"] == "queued":
        time.sleep(0.2)
    started = time.perf_counter()
    while time.perf_counter() - started < run_s and view["status"] == "running":
        time.sleep(0.5)
        view = client.get(job["links"]["self"]).json()
    progress = view["progress"]
    row |= {"queued_s": round(started - posted, 2), "progress": progress}
    if progress["done"]:
        elapsed = time.perf_counter() - started
        row["s_per_batch"] = round(elapsed / progress["done"], 2)
        row["eta_total_s"] = round(elapsed + (progress["eta_s"] or 0), 1)
    if view["status"] != "running":
        return row | {"status": view["status"]}
    key = rq.hget(f"fi:handle:{job['id']}", "key").decode()
    computation = RQJob.fetch(key, connection=rq, serializer=JSONSerializer)
    t = time.perf_counter()
    client.delete(job["links"]["self"])
    while computation.get_status(refresh=True).value != "stopped":
        time.sleep(0.02)
    return row | {"cancel_to_stopped_s": round(time.perf_counter() - t, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-s", type=float, default=8.0)
    parser.add_argument("--long-s", default="20")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "registry"
        assert registry_main(["--root", str(root), "demo", "--generative"]) == 0
        log = Path(tmp) / "worker.log"
        env = {"ATTR_TORCH_THREADS": "2", "ATTR_BATCH_SIZE": "1024", "ATTR_LONG_JOB_S": args.long_s}
        with service(root, warm=True, worker_log=log, **env) as client:
            rq = redis.Redis.from_url(client.redis_url)
            for path, body in (("/v1/analyses/leakage", TEXT), ("/v1/attributions", DIGITS)):
                print(json.dumps(measure(client, path, body, args.run_s, rq)), flush=True)
        print(json.dumps({"interrupted_mid_batch": log.read_text().count("interrupted mid-batch")}))


if __name__ == "__main__":
    main()
