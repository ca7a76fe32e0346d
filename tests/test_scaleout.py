"""One request over several workers (RQ dependencies, per-part shard jobs, a reduce job), with real
`python -m worker` processes and a real redis-server: equal to one job's result exactly, a worker killed
mid-part does not lose the request, a cancel stops every part, parts land where their shard is warm, and
a training set larger than a worker's warm budget is streamed within it. Plus the score store's windows."""

from __future__ import annotations

import io
import shutil
import signal
import time

import numpy as np
import pytest
import redis as redis_lib
import torch
from fastapi.testclient import TestClient
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from safetensors.torch import save_file

from contract.registry import Registry
from tests.conftest import start_worker, wait_for

pytestmark = pytest.mark.slow
TEST = {"dataset": "digits-test", "indices": [0, 1, 2]}


def resplit(registry_dir, id: str, shards: int, tile: int, tmp_path) -> int:
    """Register digits-train tiled `tile` times as dataset `id` in `shards` equal shards; its size."""
    registry = Registry(registry_dir)
    train = registry.dataset("digits-train")
    whole = {k: np.concatenate([train.rows(n)[k] for n in range(len(train.shards))]) for k in ("inputs", "targets")}
    whole = {k: np.concatenate([v] * tile) for k, v in whole.items()}
    size = len(whole["inputs"]) // shards * shards
    files = []
    for n, rows in enumerate(np.split(np.arange(size), shards)):
        files.append(tmp_path / f"{id}-{n}.safetensors")
        save_file({k: torch.from_numpy(v[rows].copy()) for k, v in whole.items()}, files[-1])
    registry.add_dataset(id, files, train.input.model_dump(), trained=["digits-mlp"])
    return size


@pytest.fixture
def fleet(big_settings, tmp_path):
    """The registry with `digits-three` (digits-train in 3 shards) and `digits-big3` (tiled 40x, 3
    shards of 19,160), settings that fan a request out per shard, and started workers (stopped after)."""
    resplit(big_settings.registry_dir, "digits-three", 3, 1, tmp_path)
    resplit(big_settings.registry_dir, "digits-big3", 3, 40, tmp_path)
    settings = big_settings.model_copy(update={"part_records": 1, "stacking": "vmap"})
    procs = []

    def start(n: int, **extra):
        names = [f"w{len(procs) + i}" for i in range(n)]
        procs.extend(start_worker(settings, name, ATTR_STACKING="vmap", **extra) for name in names)
        redis = redis_lib.Redis.from_url(settings.redis_url)
        wait_for(lambda: all(redis.exists(settings.key("worker", name)) for name in names), timeout=60)
        return names

    yield settings, start, procs
    for proc in procs:
        proc.kill()
        proc.wait(10)


def stats(settings, name) -> dict:
    raw = redis_lib.Redis.from_url(settings.redis_url).hgetall(settings.key("worker", name))
    return {k.decode(): float(v) for k, v in raw.items() if k.decode() not in ("name", "device")}


def finish(api, created, timeout=120) -> dict:
    url = created.json()["links"]["self"]
    return wait_for(lambda: (j := api.get(url).json())["status"] not in ("queued", "running") and j, timeout=timeout)


def npy(api, job, **params) -> np.ndarray:
    got = api.get(job["links"]["scores"], params={"format": "npy", **params})
    assert got.status_code == 200, got.text
    return np.load(io.BytesIO(got.content), allow_pickle=False)


def test_a_fanned_out_request_equals_one_job_exactly(fleet):
    from app.main import create_app
    from worker.__main__ import WarmWorker

    settings, start, _ = fleet
    body = {
        "model": "digits-mlp",
        "dataset": "digits-three",
        "test": TEST,
        "top_k": 5,
        "method": {"precondition": "diag"},
    }
    one = settings.model_copy(update={"part_records": 10**9})
    with TestClient(create_app(one)) as api:
        created = api.post("/v1/attributions", json=body)
        WarmWorker(one, name="single").work(burst=True)
        single = finish(api, created)
        assert single["status"] == "finished", single
        whole = npy(api, single)
    redis_lib.Redis.from_url(settings.redis_url).flushall()  # the same request again, from scratch

    fanned = settings.model_copy(update={"score_redis_max_bytes": 2000})  # two of the blocks go to files
    names = start(2, ATTR_SCORE_REDIS_MAX_BYTES=2000)
    time.sleep(settings.ready_ttl_s / 3 + 0.5)  # each has seen the other: a slot and an even share
    with TestClient(create_app(fanned)) as api:
        created = api.post("/v1/attributions", json=body)
        reduce, parts = parts_of(settings, created.json()["id"])
        assert len(parts) == 3 and reduce.get_status() == JobStatus.DEFERRED
        done = finish(api, created)
        assert done["status"] == "finished", done
        assert done["result"]["rows"] == single["result"]["rows"]  # top-k merged from the parts
        np.testing.assert_array_equal(npy(api, done), whole)
        result = done["result"]
        assert result["shape"] == [3, 1437] and done["progress"]["done"] == done["progress"]["total"]

        # windows of the stored blocks, across block boundaries, JSON in pages
        np.testing.assert_array_equal(npy(api, done, rows="1:3", columns="400:1000"), whole[1:3, 400:1000])
        first = api.get(done["links"]["scores"], params={"columns": "470:", "rows": ":2"})
        assert first.json()["columns"] == [470, 1437] and first.json()["next"] is None
        np.testing.assert_array_equal(np.array(first.json()["scores"], dtype=np.float32), whole[:2, 470:])
        assert api.get(done["links"]["scores"], params={"columns": "9:9"}).status_code == 422
        assert api.get(done["links"]["report"]).status_code == 200

        # parts go to their affinity queue's owner first: once each owner holds its shards (an idle worker
        # may have taken one over while its owner computed the curvature), no shard is read again
        def loads():
            return [stats(settings, n).get("shard_loads", 0) for n in names]

        for indices in ([7], [8]):
            before = loads()
            again = api.post("/v1/attributions", json={**body, "test": {"dataset": "digits-test", "indices": indices}})
            assert finish(api, again)["status"] == "finished"
        assert loads() == before and sum(before) >= 3, (before, loads())
        counts = [stats(settings, n) for n in names]
        assert all(c.get("jobs", 0) >= 3 for c in counts)  # both workers had parts
        # computed once for the fleet, not once per worker: the curvature, and each shard's base losses
        assert sum(c.get("curvature_estimates", 0) for c in counts) == 1
        assert sum(c.get("base_computes", 0) for c in counts) == 3

        # a deleted result's score files are removed by the workers' maintenance (once past a job's time limit)
        files = settings.score_dir / reduce.id
        assert files.is_dir()  # its 3-row blocks are over 2,000 bytes
        assert api.delete(f"/v1/attributions/{done['id']}").status_code == 204
    from worker.store import Store

    Store(redis_lib.Redis.from_url(settings.redis_url), settings.model_copy(update={"job_timeout_s": 0})).sweep_files()
    assert not files.exists()


def big_body(n_test=16):
    return {
        "model": "digits-mlp",
        "dataset": "digits-big3",
        "test": {"dataset": "digits-test", "indices": list(range(n_test))},
        "method": {"mode": "finite", "optimizer": "adam", "precondition": "none"},
    }


def parts_of(settings, handle) -> tuple[RQJob, list[RQJob]]:
    redis = redis_lib.Redis.from_url(settings.redis_url)
    key = redis.hget(settings.key("handle", handle), "key").decode()
    reduce = RQJob.fetch(key, connection=redis, serializer=JSONSerializer)
    return reduce, [RQJob.fetch(p, connection=redis, serializer=JSONSerializer) for p in reduce.meta["parts"]]


def test_a_worker_killed_mid_part_does_not_lose_the_request(fleet):
    from app.main import create_app

    settings, start, procs = fleet
    start(2)
    with TestClient(create_app(settings)) as api:
        created = api.post("/v1/attributions", json=big_body())
        _, parts = parts_of(settings, created.json()["id"])
        wait_for(lambda: sum(p.get_status() == JobStatus.STARTED for p in parts) == 2, timeout=60)
        wait_for(lambda: api.get(created.json()["links"]["self"]).json()["progress"]["done"] > 0)
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        done = finish(api, created, timeout=180)
        took = time.monotonic() - killed
    assert done["status"] == "finished", done["error"]
    assert len(done["result"]["rows"]) == 16 and done["result"]["shape"] == [16, 57480]
    # the abandoned part is requeued once its heartbeat lapses (2 s) at the next maintenance pass (1 s)
    print(f"finished {took:.1f} s after the kill")


def test_a_cancel_stops_every_part(fleet):
    from app.main import create_app

    settings, start, procs = fleet
    start(2)
    with TestClient(create_app(settings)) as api:
        created = api.post("/v1/attributions", json=big_body())
        reduce, parts = parts_of(settings, created.json()["id"])
        wait_for(lambda: sum(p.get_status() == JobStatus.STARTED for p in parts) == 2, timeout=60)
        canceled = api.delete(created.json()["links"]["self"])
        assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
        ended = (JobStatus.STOPPED, JobStatus.CANCELED)
        wait_for(lambda: all(p.get_status() in ended for p in parts), timeout=30)
        assert sorted(p.get_status() for p in parts).count(JobStatus.STOPPED) == 2  # the two that ran
        assert reduce.get_status() == JobStatus.CANCELED
        assert all(p.poll() is None for p in procs)  # the workers stay up for the next job


def test_a_training_set_larger_than_the_warm_budget_is_streamed_within_it(fleet):
    from app.main import create_app

    settings, start, _ = fleet
    budget = 4 << 20  # each shard of digits-big3 is 19,160 x 65 values (~5 MB): none may be held
    [name] = start(1, ATTR_WARM_BYTES=budget, ATTR_BATCH_SIZE=1024)
    with TestClient(create_app(settings)) as api:
        done = finish(api, api.post("/v1/attributions", json=big_body(2)))
    assert done["status"] == "finished", done
    counts = stats(settings, name)
    assert counts["shard_streams"] >= 3 and counts.get("shard_loads", 0) == 0
    assert 0 < counts["warm_bytes"] <= budget


def test_the_default_warm_budget_is_a_share_of_free_memory_split_among_the_hosts_workers():
    import os

    from contract.settings import Settings
    from worker.warm import available_memory, budget

    cpu, cores = torch.device("cpu"), len(os.sched_getaffinity(0))
    assert budget(Settings(warm_bytes=123 << 20), cpu) == 123 << 20  # stated: as stated
    free = available_memory()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    one = budget(Settings(warm_share=0.5), cpu)  # one worker with every core
    assert abs(one - free / 2) < 0.05 * free
    split = budget(Settings(warm_share=0.5, torch_threads=1), cpu)  # a worker per core
    assert abs(split * cores - one) < 0.05 * free


@pytest.mark.parametrize(
    "path, body",
    [
        ("leakage", {"test": {"dataset": "digits-audit-test", "indices": [0, 1, 100, 200]}, "calibration_records": 32}),
        ("mislabeled", {"reference": {"dataset": "digits-audit-test", "indices": list(range(40, 80))}}),
        (
            "memorization",
            {
                "records": {"dataset": "digits-audit-three", "indices": [0, 1, 700]},
                "calibration_records": 32,
                "method": {"precondition": "diag"},  # the exact Hessian's store round trip: a test below
            },
        ),
    ],
)
def test_an_analysis_fans_out_to_the_same_answer(settings, tmp_path, path, body):
    """In-process workers drain the parts, then the reduce (RQ enqueues it once the last part ends)."""
    from app.main import create_app
    from worker.__main__ import WarmWorker

    root = tmp_path / "registry"
    shutil.copytree(settings.registry_dir, root)
    registry = Registry(root)
    audit = registry.dataset("digits-audit-train")
    whole = {k: np.concatenate([audit.rows(n)[k] for n in range(len(audit.shards))]) for k in ("inputs", "targets")}
    files = []
    for n, rows in enumerate(np.array_split(np.arange(len(whole["inputs"])), 3)):
        files.append(tmp_path / f"audit-{n}.safetensors")
        save_file({k: torch.from_numpy(v[rows].copy()) for k, v in whole.items()}, files[-1])
    registry.add_dataset("digits-audit-three", files, audit.input.model_dump(), trained=["digits-audit-mlp"])
    body = {"model": "digits-audit-mlp", "dataset": "digits-audit-three", **body}
    answers = []
    for part_records in (10**9, 1):
        redis_lib.Redis.from_url(settings.redis_url).flushall()
        these = settings.model_copy(update={"registry_dir": root, "part_records": part_records, "stacking": "vmap"})
        with TestClient(create_app(these)) as api:
            created = api.post(f"/v1/analyses/{path}", json=body)
            assert created.status_code == 202, created.text
            WarmWorker(these, name=f"w{part_records}").work(burst=True)
            done = api.get(created.json()["links"]["self"]).json()
            assert done["status"] == "finished", done
            answers.append((done["result"], npy(api, done)))
    assert answers[0][0] == answers[1][0]
    np.testing.assert_array_equal(answers[0][1], answers[1][1])


@pytest.mark.parametrize("kind", ["hessian", "lowrank", "diag", "ekfac"])
def test_a_stored_curvature_solves_exactly_as_the_computed_one(settings, kind):
    """One worker computes the curvature, another restores it from the store (a file, here): the same
    solves, bit for bit (a column-major Cholesky factor once came back transposed)."""
    from worker.forward_inf import ForwardInf, MirrorConfig, build
    from worker.forward_inf.tasks import Classification
    from worker.store import Store
    from worker.warm import Warm

    registry = Registry(settings.registry_dir)
    m, d = registry.model("digits-mlp"), registry.dataset("digits-train")
    model = build("builtin:mlp", {"in_features": 64, "out_features": 10, "hidden": [8]})
    x, y = (torch.from_numpy(v) for v in (d.rows(0)["inputs"][:200], d.rows(0)["targets"][:200]))
    config = MirrorConfig(precondition=kind, curvature_samples=200)
    store = Store(
        redis_lib.Redis.from_url(settings.redis_url), settings.model_copy(update={"score_redis_max_bytes": 0})
    )
    solved, left_out = [], []
    for _ in range(2):  # a fresh warm cache each time: computed, then restored
        fi = ForwardInf(model, Classification(), config)
        curvature = Warm(store, 1 << 30, torch.device("cpu")).curvature(
            m, d, fi, lambda fi=fi: fi.estimate_curvature((x, y))
        )
        grads = {
            n: torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(0)) for n, p in fi.fm.theta.items()
        }
        solved.append(curvature.solve(grads))
        left_out.append([getattr(curvature, f, None) for f in ("left_out", "refused")])  # lowrank: in its notes
    assert any(settings.score_dir.glob("blobs/curvature-*.safetensors")) and left_out[0] == left_out[1]
    for name in solved[0]:
        assert torch.equal(solved[0][name], solved[1][name]), name


def test_the_ekfac_auto_took_for_an_indefinite_hessian_is_stored_and_adopted_by_the_next_engine(settings):
    """A model stopped early: the first worker's "auto" finds the Hessian indefinite past the damping and
    stores EK-FAC under the low-rank key; a second (fresh warm cache, planned as jobs.engine does) adopts
    it without estimating, switches, and solves bit for bit the same."""
    from worker.demo import digits_mlp
    from worker.forward_inf import ForwardInf, MirrorConfig
    from worker.forward_inf.tasks import Classification
    from worker.store import Store
    from worker.warm import Warm

    registry = Registry(settings.registry_dir)
    m, d = registry.model("digits-mlp"), registry.dataset("digits-train")
    x, y = (torch.from_numpy(v) for v in (d.rows(0)["inputs"], d.rows(0)["targets"]))
    model = digits_mlp(x, y, hidden=16, epochs=20)
    store = Store(redis_lib.Redis.from_url(settings.redis_url), settings)
    engines, estimates = [], []
    for _ in range(2):
        fi = ForwardInf(model, Classification(), MirrorConfig()).plan((x, y))
        assert fi.precondition == "lowrank"
        warm = Warm(store, 1 << 30, torch.device("cpu"))
        fi.use(warm.curvature(m, d, fi, lambda fi=fi: fi.estimate_curvature((x, y))))
        engines.append(fi)
        estimates.append(warm.counters["curvature_estimates"])
    assert estimates == [1, 0] and [fi.precondition for fi in engines] == ["ekfac", "ekfac"]
    assert engines[1].execution()["notes"] == engines[0].execution()["notes"]
    grads = {
        n: torch.randn(3, *p.shape, generator=torch.Generator().manual_seed(0)) for n, p in model.named_parameters()
    }
    solved = [fi.curvature.solve(grads) for fi in engines]
    for name in solved[0]:
        assert torch.equal(solved[0][name], solved[1][name]), name


def test_a_streamed_shard_is_read_a_batch_ahead_by_a_thread(big_settings, monkeypatch):
    """A shard over the warm budget is read batch by batch (worker.warm.Stream), each next batch by a
    thread while the sweep computes on this one: the same batches as a plain read, read ahead."""
    import threading

    from worker.warm import Stream

    d = Registry(big_settings.registry_dir).dataset("digits-big")
    plain = list(d.batches(0, 4096))
    readers, rows = [], type(d).rows

    def seen(self, *args, **kwargs):  # records the reading thread, then reads as before
        readers.append(threading.current_thread().name)
        return rows(self, *args, **kwargs)

    monkeypatch.setattr(type(d), "rows", seen)
    batches = iter(Stream(d, 0, 4096))
    first = next(batches)
    wait_for(lambda: len(readers) == 2, timeout=30)  # the second batch is read before it is asked for
    streamed = [first, *batches]
    assert len(streamed) == len(plain) > 2 and all(name.startswith("prefetch") for name in readers)
    for a, b in zip(plain, streamed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(torch.from_numpy(a[k]), b[k]) for k in a)
