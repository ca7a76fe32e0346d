"""The training-side index and two-stage attribution (worker/index.py, app/indexes.py): built by real
workers over HTTP, searched, and its candidates re-scored exactly."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from contract.indexes import IndexEntry, shard_path
from contract.registry import Registry
from contract.schemas import AttributionPublic, IndexPublic

TRAIN = {"model": "digits-mlp", "dataset": "digits-train"}
TEST = {"dataset": "digits-test", "indices": [0, 1, 2]}


def build(client, worker, **body) -> dict:
    created = client.post("/v1/indexes", json={**TRAIN, **body})
    assert created.status_code in (200, 202), created.text
    worker.work(burst=True)
    done = client.get(created.json()["links"]["self"]).json()
    assert done["status"] == "finished", done
    return IndexPublic.model_validate(done).model_dump(mode="json")


def attribute(client, worker, **body) -> dict:
    created = client.post("/v1/attributions", json={**TRAIN, "test": TEST, "top_k": 10, **body})
    assert created.status_code in (200, 202), created.text
    worker.work(burst=True)
    done = client.get(created.json()["links"]["self"], params={"wait_s": 5}).json()
    assert done["status"] == "finished", done
    return AttributionPublic.model_validate(done).model_dump(mode="json")


def scores(client, job) -> tuple[np.ndarray, list[int] | None]:
    page = client.get(f"/v1/attributions/{job['id']}/scores").json()
    return np.array(page["scores"], dtype=np.float32), page.get("records")


def test_two_stage_scores_equal_the_full_sweeps_on_the_candidates(client, worker, settings):
    index = build(client, worker)
    entry = index["index"]
    assert entry["records"] == 1437 and entry["bytes_per_record"] > 0 and 0 < entry["recall"] <= 1
    assert entry["settings"] == {"dims": 256, "rank": 64}
    assert all(shard_path(settings, entry["basis"], s["sha256"]).is_file() for s in entry["shards"])

    full = attribute(client, worker, candidates=0)
    two = attribute(client, worker, candidates=100)
    assert full["result"]["index"] is None
    use = two["result"]["index"]
    assert use["index"] == index["id"] and use["candidates"] == 100 and 100 <= use["rescored"] <= 600
    everything, _ = scores(client, full)
    candidates, records = scores(client, two)
    assert candidates.shape == (3, use["rescored"]) and len(records) == use["rescored"]
    np.testing.assert_allclose(candidates, everything[:, records], rtol=1e-5, atol=1e-7)
    for a, b in zip(two["result"]["rows"], full["result"]["rows"], strict=True):  # the top-10 found at both ends
        assert [p["index"] for p in a["proponents"]] == [p["index"] for p in b["proponents"]]
        assert [p["index"] for p in a["opponents"]] == [p["index"] for p in b["opponents"]]


# -- a registry of our own: the digits training set in shards, so that a build fans out over parts ----------
@pytest.fixture
def sharded(settings, registry_dir, tmp_path):
    """(settings on a copy of the demo registry with `digits-parts`: digits-train in 3 shards, one part
    each (ATTR_PART_RECORDS=500), and a function that (re)registers `digits-parts` from the first n)."""
    import shutil

    root = tmp_path / "registry"
    shutil.copytree(registry_dir, root)
    registry = Registry(root)
    train = registry.dataset("digits-train")
    parts = [load_file(train.path / s.file) for s in train.shards]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    files = []
    for n, lo in enumerate(range(0, 1437, 479)):
        files.append(tmp_path / f"part-{n}.safetensors")
        save_file({k: v[lo : lo + 479].contiguous() for k, v in whole.items()}, files[-1])

    def register(shards: int) -> None:
        registry.add_dataset("digits-parts", files[:shards], train.input.model_dump(), trained=["digits-mlp"])

    register(3)
    return settings.model_copy(update={"registry_dir": root, "part_records": 500}), register


@pytest.fixture
def sharded_client(sharded):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(sharded[0]), raise_server_exceptions=False) as c:
        yield c


def sketches(settings, entry) -> list[np.ndarray]:
    from worker import search

    return [
        search.load(shard_path(settings, entry["basis"], s["sha256"]).read_bytes()).reconstruct_n(0, s["records"])
        for s in entry["shards"]
    ]


def test_an_index_built_by_two_workers_equals_one_built_by_one(sharded, sharded_client):
    from conftest import start_worker, stop_worker, wait_for

    from worker.__main__ import WarmWorker

    settings, _ = sharded
    body = {"model": "digits-mlp", "dataset": "digits-parts"}
    one = WarmWorker(settings, name="one")
    created = sharded_client.post("/v1/indexes", json=body).json()
    one.work(burst=True)
    alone = sharded_client.get(created["links"]["self"]).json()
    assert alone["status"] == "finished", alone
    first = sketches(settings, alone["index"])
    assert sharded_client.delete(created["links"]["self"]).status_code == 204

    # each worker owns the affinity queues of some parts and steals none: both build, neither alone
    from contract.jobs import bucket_of
    from contract.registry import Registry as Reg

    digest = Reg(settings.registry_dir).dataset("digits-parts").digest
    buckets = [bucket_of(digest, first, settings.affinity_buckets) for first in range(3)]
    own = [sorted({buckets[0], buckets[2]}), sorted({buckets[1]} - {buckets[0], buckets[2]})]
    assert own[1], "the parts' buckets collide; pick other shard sizes"
    workers = [
        start_worker(settings, f"pair-{n}", ATTR_WORKER_QUEUES=",".join(map(str, own[n])), ATTR_STEAL_AFTER_S=5)
        for n in range(2)
    ]
    redis = sharded_client.app.state.redis
    try:
        wait_for(lambda: all(redis.exists(settings.key("worker", f"pair-{n}")) for n in range(2)), timeout=120)
        again = sharded_client.post("/v1/indexes", json=body)
        assert again.status_code == 202 and again.json()["id"] == created["id"]  # the same identity
        view = wait_for(lambda: (v := sharded_client.get(created["links"]["self"]).json())["status"] == "finished" and v,
                        timeout=300, interval=0.2)  # fmt: skip
    finally:
        try:
            for w in workers:
                stop_worker(w)
        finally:  # none outlives the test, even when one would not stop in time
            for w in workers:
                w.kill()
    assert len(view["index"]["shards"]) == 3
    from rq.job import Job as RQJob

    from contract.jobs import part_id

    ran = {RQJob.fetch(part_id(created["id"], n), connection=redis).worker_name for n in range(3)}
    assert ran == {"pair-0", "pair-1"}
    for a, b in zip(first, sketches(settings, view["index"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_new_dataset_version_indexes_only_its_new_shard_and_deleting_frees_what_no_other_uses(
    sharded, sharded_client, worker
):
    settings, register = sharded
    register(2)
    body = {"model": "digits-mlp", "dataset": "digits-parts"}
    from worker.__main__ import WarmWorker

    w = WarmWorker(settings, name="grow")
    old = sharded_client.post("/v1/indexes", json=body).json()
    w.work(burst=True)
    old = sharded_client.get(old["links"]["self"]).json()["index"]
    files = [shard_path(settings, old["basis"], s["sha256"]) for s in old["shards"]]
    inodes = [f.stat().st_ino for f in files]

    register(3)  # a new version: the two shards it had, and one more
    new = sharded_client.post("/v1/indexes", json=body).json()
    assert new["id"] != old["id"]
    w.work(burst=True)
    new = sharded_client.get(new["links"]["self"]).json()["index"]
    assert new["basis"] == old["basis"] and new["basis_of"] == old["dataset"]
    assert [s["seconds"] > 0 for s in new["shards"]] == [False, False, True]
    assert [f.stat().st_ino for f in files] == inodes  # the old shards were not written again
    assert new["records"] == 1437

    # the old version's index is no longer served: the dataset changed
    two_stage = {"model": "digits-mlp", "dataset": "digits-parts", "test": TEST, "candidates": 50}
    job = sharded_client.post("/v1/attributions", json=two_stage).json()
    w.work(burst=True)
    assert sharded_client.get(job["links"]["self"]).json()["result"]["index"]["index"] == new["id"]

    assert sharded_client.delete(f"/v1/indexes/{old['id']}").status_code == 204
    assert sharded_client.get(f"/v1/indexes/{old['id']}").status_code == 404
    w.run_maintenance_tasks()  # the workers free a deleted index's files (the API's mount is read-only)
    assert all(f.is_file() for f in files)  # the new index still uses them
    assert sharded_client.delete(f"/v1/indexes/{new['id']}").status_code == 204
    assert all(f.is_file() for f in files)
    from worker.store import claim

    time.sleep(0.05)
    assert claim(files[0])  # a build of this basis started since the deletion and reuses this shard: kept
    w.run_maintenance_tasks()
    assert [f.is_file() for f in files] == [True, False]
    w.context.store.redis.zadd(IndexEntry.orphans(settings), {new["basis"]: time.time() + 1})
    w.run_maintenance_tasks()  # (that build was deleted too)
    assert not files[0].parent.exists()
    assert sharded_client.get("/v1/indexes").json() == {"items": []}
    refused = sharded_client.post("/v1/attributions", json=two_stage)
    assert refused.status_code == 422 and "POST /v1/indexes" in refused.json()["detail"]


def test_a_changed_model_never_finds_the_old_index(sharded, sharded_client):
    settings, _ = sharded
    from worker.__main__ import WarmWorker

    w = WarmWorker(settings, name="changed")
    built = sharded_client.post("/v1/indexes", json={"model": "digits-mlp", "dataset": "digits-parts"}).json()
    w.work(burst=True)
    assert sharded_client.get(built["links"]["self"]).json()["status"] == "finished"
    registry = Registry(settings.registry_dir)
    m = registry.model("digits-mlp")
    state = {k: v + 0.01 for k, v in load_file(m.path / m.weights).items()}
    save_file(state, settings.registry_dir.parent / "changed.safetensors")
    registry.add_model("digits-mlp", m.task, m.architecture, settings.registry_dir.parent / "changed.safetensors",
                       m.input.model_dump(), m.params, m.method.model_dump(exclude_none=True))  # fmt: skip
    body = {"model": "digits-mlp", "dataset": "digits-parts", "test": TEST, "candidates": 50}
    refused = sharded_client.post("/v1/attributions", json=body)
    assert refused.status_code == 422 and "no index" in refused.json()["detail"]
    full = sharded_client.post("/v1/attributions", json={**body, "candidates": None})
    assert full.status_code == 202
    w.work(burst=True)
    assert sharded_client.get(full.json()["links"]["self"]).json()["result"]["index"] is None
    # a payload resolved before the change names the old index: its worker refuses it, with the reason
    from contract.jobs import AttributionJob, DatasetRef, ModelRef, RecordPoints

    d = registry.dataset("digits-parts")
    stale = AttributionJob(
        model=ModelRef(id="digits-mlp", digest=registry.model("digits-mlp").digest),
        dataset=DatasetRef(id=d.id, digest=d.digest),
        dtype=settings.dtype,
        method=sharded_client.get(built["links"]["self"]).json()["index"]["method"],
        test=RecordPoints(dataset=DatasetRef(id=d.id, digest=d.digest), indices=[0]),
        index=built["id"],
        candidates=50,
    )
    sharded_client.app.state.jobs.start(stale, "local", [(0, 1)])
    w.work(burst=True)
    state = sharded_client.app.state.jobs.state(stale.key)
    assert state["status"] == "failed" and "not this model's" in state["error"]


def test_leakage_through_the_index_flags_what_the_full_analysis_flags(client, worker, settings):
    """The demo audit set (tests/test_analyses.py): 400 test images, the first 40 planted in training; the
    analysis through the index confirms 16 candidates per image re-alignment instead of sweeping all."""
    audit = {"model": "digits-audit-mlp", "dataset": "digits-audit-train"}
    created = client.post("/v1/indexes", json={**audit, "method": {"precondition": "none"}})
    worker.work(burst=True)
    assert client.get(created.json()["links"]["self"]).json()["status"] == "finished"
    test = {"dataset": "digits-audit-test", "indices": list(range(200))}
    answers = {}
    for candidates in (0, None):  # the full analysis, then the default: through the index
        body = {**audit, "test": test, "candidates": candidates}
        made = client.post("/v1/analyses/leakage", json=body)
        assert made.status_code == 202, made.text
        worker.work(burst=True)
        answers[candidates] = client.get(made.headers["location"]).json()["result"]
    full, indexed = answers[0], answers[None]
    assert full["index"] is None and indexed["index"]["candidates"] == 16
    flagged = [[(r["row"], r["match"], r["best"]["index"]) for r in a["rows"] if r["leaked"]] for a in (full, indexed)]
    assert flagged[0] == flagged[1] and len(flagged[0]) >= 38
    made = client.post("/v1/analyses/leakage", json={**audit, "test": test})
    assert client.get(f"/v1/analyses/{made.json()['id']}/scores").status_code == 409  # no score matrix
    # training images darkened or moved by a pixel: near duplicates of their originals, found through the index
    from worker.demo import audit_data

    truth, originals = audit_data(), [3, 10, 200, 700, 1300]
    x = truth["inputs"][originals].reshape(-1, 8, 8)
    moved = torch.roll(x, 1, dims=2)
    moved[..., 0] = 0
    inline = {
        "inputs": torch.cat([0.7 * x, moved]).flatten(1).tolist(),
        "targets": truth["targets"][originals].repeat(2).tolist(),
    }
    made = client.post("/v1/analyses/leakage", json={**audit, "test": inline})
    worker.work(burst=True)
    rows = client.get(made.headers["location"]).json()["result"]["rows"]
    assert [(r["match"], r["best"]["index"]) for r in rows] == [("near-duplicate", i) for i in originals * 2]


def test_a_dataset_registered_with_index_builds_it(sharded, sharded_client):
    """(On a copy of the registry: registration writes into it.)"""
    from worker.__main__ import WarmWorker

    settings, client = sharded[0], sharded_client
    worker = WarmWorker(settings, name="registration")
    train = Registry(settings.registry_dir).dataset("digits-train")
    shard = (train.path / train.shards[0].file).read_bytes()
    assert client.put("/v1/admin/datasets/fresh/files/part.safetensors", content=shard).status_code == 201
    body = {"input": train.input.model_dump(), "shards": ["part.safetensors"], "trained": ["digits-mlp"],
            "index": ["digits-mlp"]}  # fmt: skip
    made = client.post("/v1/admin/datasets/fresh", json=body)
    assert made.status_code == 200, made.text
    (building,) = made.json()["indexes"]
    assert building["status"] == "queued" and building["dataset"] == "fresh"
    worker.work(burst=True)
    index = client.get(building["links"]["self"]).json()
    assert index["status"] == "finished" and index["index"]["records"] == train.shards[0].size
    unknown = client.post("/v1/admin/datasets/other", json={**body, "index": ["no-such-model"]})
    assert unknown.status_code == 404
