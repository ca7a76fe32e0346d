"""The service end to end over HTTP, with a real redis-server and warm workers drained in-process."""

import io
import json
import re
import subprocess
import time
import zlib

import numpy as np
import pytest
import redis as redis_lib
import torch

from contract.jobs import JOB_FUNC
from contract.registry import Registry
from contract.schemas import AttributionPublic
from tests.conftest import PYTHON, ROOT, queued_jobs

TEST = {"dataset": "digits-test", "indices": [0, 1, 2]}


FAST = {"precondition": "none"}  # where a test is about the service, not the curvature estimate (~10 s)


def post(client, **changes):
    body = {"model": "digits-mlp", "dataset": "digits-train", "test": TEST, "top_k": 5, "method": FAST, **changes}
    return client.post("/v1/attributions", json=body)


def worker_stats(worker) -> dict:
    """The counters a worker publishes in its heartbeat (read from the object: a burst worker's
    heartbeat record is removed when it stops)."""
    return {**worker.context.stats, **worker.context.warm.counters}


def direct_scores(registry_dir, indices, config=None):
    """The engine called directly on the registered model and data: what the service must return."""
    from safetensors.torch import load_file

    from worker.forward_inf import Classification, MirrorConfig, attribute, build

    registry = Registry(registry_dir)
    m = registry.model("digits-mlp")
    model = build(m.architecture, m.params)
    model.load_state_dict(load_file(m.path / m.weights))
    d = registry.dataset("digits-train")
    shards = [load_file(d.path / s.file) for s in d.shards]
    train = (torch.cat([s["inputs"] for s in shards]), torch.cat([s["targets"] for s in shards]))
    test = load_file(registry.dataset("digits-test").path / "shard-000.safetensors")
    return attribute(
        model, Classification(), train, (test["inputs"][indices], test["targets"][indices]), config or MirrorConfig()
    )


def test_full_loop_matches_the_engine_and_caches(client, settings, worker, registry_dir):
    created = post(client, method={})  # the model's defaults: the attribution preset
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "queued" and created.headers["location"] == f"/v1/attributions/{job['id']}"

    start = time.monotonic()
    waited = client.get(f"/v1/attributions/{job['id']}", params={"wait_s": 0.3}).json()
    assert waited["status"] == "queued" and time.monotonic() - start >= 0.3  # a long poll that times out
    worker.work(burst=True)
    done = client.get(f"/v1/attributions/{job['id']}", params={"top_k": 5, "wait_s": 5}).json()
    assert done["status"] == "finished", done
    AttributionPublic.model_validate(done)  # the hot path assembles views from stored parts: they fit the schema
    AttributionPublic.model_validate(waited)
    assert done["progress"]["done"] == done["progress"]["total"] > 0
    assert done["timing"]["search_s"] is None  # a full sweep: no index searched
    assert all(done["timing"][k] >= 0 for k in ("load_s", "mirror_s", "sweep_s", "store_s"))

    assert len(client.get(job["links"]["self"]).json()["result"]["rows"][0]["proponents"]) == 5  # the POST's top_k
    assert len(client.get(job["links"]["self"], params={"top_k": 2}).json()["result"]["rows"][0]["opponents"]) == 2
    expected = direct_scores(registry_dir, TEST["indices"])
    rows = done["result"]["rows"]
    assert len(rows) == 3
    for row, want in zip(rows, expected, strict=True):
        assert [p["index"] for p in row["proponents"]] == want.topk(5).indices.tolist()
        assert [p["index"] for p in row["opponents"]] == want.topk(5, largest=False).indices.tolist()
        assert row["proponents"][0]["record_id"] == f"digits-train:{row['proponents'][0]['index']}"
        np.testing.assert_allclose([p["score"] for p in row["proponents"]], want.topk(5).values, rtol=1e-4)

    again = post(client, method={})
    assert again.status_code == 200 and again.json()["cached"] is True
    assert again.json()["id"] == job["id"]
    assert len(queued_jobs(settings)) == 0  # the cache hit enqueued nothing

    scores = client.get(f"/v1/attributions/{job['id']}/scores").json()
    assert scores["shape"] == [3, 1437]
    npy = client.get(f"/v1/attributions/{job['id']}/scores", headers={"accept": "application/x-npy"})
    assert npy.headers["content-type"] == "application/x-npy"
    matrix = np.load(io.BytesIO(npy.content), allow_pickle=False)
    assert matrix.dtype == np.float32 and matrix.shape == (3, 1437)
    np.testing.assert_allclose(matrix, expected.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(matrix, np.array(scores["scores"], dtype=np.float32))

    # other settings on the same model and training set (group mode) reuse the curvature estimate;
    # the mislabeled preset's curvature (a diagonal Fisher) is a second one
    group = post(client, method={"group": True})
    worker.work(burst=True)
    assert client.get(group.json()["links"]["self"]).json()["status"] == "finished"
    assert worker_stats(worker)["curvature_estimates"] == 1
    reference = {"dataset": "digits-test", "indices": [5, 6, 7]}
    mislabeled = client.post(
        "/v1/analyses/mislabeled", json={"model": "digits-mlp", "dataset": "digits-train", "reference": reference}
    )
    worker.work(burst=True)
    assert client.get(mislabeled.json()["links"]["self"]).json()["status"] == "finished"
    assert worker_stats(worker)["curvature_estimates"] == 2


@pytest.mark.parametrize("method", [{"precondition": "hessian", "params": ["net.3.*"]}, {"precondition": "ekfac"}])
def test_influence_function_preconditioning_over_http(client, worker, registry_dir, method):
    from worker.forward_inf import MirrorConfig

    job = post(client, method={**method, "damping": 0.01}).json()
    worker.work(burst=True)
    done = client.get(job["links"]["self"], params={"top_k": 5}).json()
    assert done["status"] == "finished", done
    assert done["execution"]["curvature"]["kind"] == method["precondition"]
    config = MirrorConfig(damping=0.01, precondition=method["precondition"], params=tuple(method.get("params", ["*"])))
    expected = direct_scores(registry_dir, TEST["indices"], config)
    for row, want in zip(done["result"]["rows"], expected, strict=True):
        assert [p["index"] for p in row["proponents"]] == want.topk(5).indices.tolist()


def test_identical_requests_share_one_job(client, settings):
    first, second = post(client), post(client)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert len(queued_jobs(settings)) == 1
    different = post(client, top_k=3, method={"mode": "finite", "optimizer": "adam", "lr": 0.01})
    assert different.json()["id"] != first.json()["id"]
    assert len(queued_jobs(settings)) == 2


def test_inline_test_points(client, worker):
    from worker.demo import digits

    _, _, x_test, y_test = digits()
    body = {"inputs": x_test[:2].tolist(), "targets": y_test[:2].tolist()}
    created = post(client, test=body, method={"preset": "leakage"})
    assert created.status_code == 202, created.text
    worker.work(burst=True)
    done = client.get(created.json()["links"]["self"]).json()
    assert done["status"] == "finished"
    assert created.json()["method"]["score"] == "match" and created.json()["method"]["lr"] == 0.05  # resolved at POST
    assert done["execution"]["method"]["score"] == "match" and done["execution"]["method"]["lr"] == 0.05


def test_warm_state_is_reused(client, settings, worker):
    post(client)
    worker.work(burst=True)
    first = dict(worker_stats(worker))
    assert first["model_loads"] == 1 and first["base_computes"] == 2  # one model, two shards
    post(client, test={"dataset": "digits-test", "indices": [7]})
    worker.work(burst=True)
    second = worker_stats(worker)
    assert second["model_loads"] == 1 and second["base_computes"] == 2
    assert second["warm_hits"] > first.get("warm_hits", 0)
    assert second["jobs"] == 2


def test_restarted_worker_takes_base_losses_from_redis(client, settings, worker):
    from worker.__main__ import WarmWorker

    post(client)
    worker.work(burst=True)
    fresh = WarmWorker(settings, name="fresh")
    post(client, test={"dataset": "digits-test", "indices": [9]})
    fresh.work(burst=True)
    stats = worker_stats(fresh)
    assert stats.get("base_computes", 0) == 0 and stats["base_from_redis"] == 2


def test_cancel_a_queued_job(client, settings):
    job = post(client).json()
    canceled = client.delete(f"/v1/attributions/{job['id']}")
    assert canceled.status_code == 202
    assert client.get(f"/v1/attributions/{job['id']}").json()["status"] == "canceled"
    assert len(queued_jobs(settings)) == 0
    assert post(client).status_code == 202  # a new try is accepted


def test_a_tampered_weights_file_fails_the_job_with_a_clear_reason(client, worker, registry_dir, tmp_path, settings):
    import shutil

    root = tmp_path / "registry"
    shutil.copytree(registry_dir, root)
    weights = root / "models" / "digits-mlp" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from worker.__main__ import WarmWorker

    tampered = settings.model_copy(update={"registry_dir": root})
    with TestClient(create_app(tampered)) as c:
        job = c.post("/v1/attributions", json={"model": "digits-mlp", "dataset": "digits-train", "test": TEST}).json()
        WarmWorker(tampered, name="tampered").work(burst=True)
        failed = c.get(f"/v1/attributions/{job['id']}").json()
    assert failed["status"] == "failed"
    assert "weights.safetensors" in failed["error"] and "sha256" in failed["error"]
    assert "Traceback" not in failed["error"]


def test_health_readiness_and_metrics(client, settings, worker):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 503  # no worker yet
    worker.publish()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 1
    post(client)
    text = client.get("/metrics").text
    assert "attr_queue_depth 1.0" in text
    assert 'attr_http_requests_total{method="POST",route="/v1/attributions",status="202"}' in text
    assert "attr_worker_memory_bytes" in text


def test_registry_endpoints(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models] == ["digits-audit-mlp", "digits-mlp"]
    assert client.get("/v1/models/digits-mlp").json()["input"]["shape"] == [64]
    datasets = {d["id"] for d in client.get("/v1/datasets").json()}
    assert datasets == {"digits-train", "digits-test", "digits-audit-train", "digits-audit-test"}
    train = client.get("/v1/datasets/digits-train").json()
    assert train["size"] == 1437 and train["shards"] == 2


def test_openapi_operation_ids_are_stable(client):
    spec = client.get("/openapi.json").json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert ids == {
        "create_attribution",
        "get_attribution",
        "get_attribution_scores",
        "cancel_attribution",
        "get_attribution_report",
        "export_attribution",
        "follow_attribution",
        "create_leakage_analysis",
        "create_mislabeled_analysis",
        "create_memorization_analysis",
        "get_analysis",
        "get_analysis_scores",
        "get_analysis_report",
        "export_analysis",
        "follow_analysis",
        "cancel_analysis",
        "list_models",
        "get_model",
        "list_datasets",
        "get_dataset",
        "upload_file",
        "register_model",
        "register_dataset",
        "delete_model",
        "delete_dataset",
        "list_jobs",
        "create_index",
        "list_indexes",
        "get_index",
        "delete_index",
        "liveness",
        "readiness",
        "metrics",
    }
    schemas = set(spec["components"]["schemas"])  # named as the contract's classes are (a client generator's names)
    assert all(name[0].isupper() for name in schemas), sorted(schemas)
    assert {"MethodDefaults", "MethodSettings", "AnalysisPublic", "JobPage", "LeakageCreate", "Problem"} <= schemas
    docs, redoc = client.get("/docs"), client.get("/redoc")
    assert docs.status_code == redoc.status_code == 200
    for page in (docs.text, redoc.text):  # every asset from this service (the browser test renders them offline)
        assert "https://" not in page and "http://" not in page
        assert all(client.get(src).status_code == 200 for src in re.findall(r'(?:src|href)="(/[^"]+)"', page))


def test_every_success_answer_has_a_typed_schema(client):
    """Generated clients need a schema for every 2xx body: a model, or a string for text and binary."""
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith("2") and status != "204":
                    assert answer.get("content"), (method, path, status)
                    for media, content in answer["content"].items():
                        schema = content.get("schema") or {}
                        assert "$ref" in schema or schema.get("type") or schema.get("anyOf"), (method, path, media)


def test_the_api_process_never_imports_torch():
    code = "import sys, app.main; app.main.create_app(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, check=True)


def test_redis_outage_is_a_fast_503_and_recovers(client, redis_server):
    redis_server.stop()
    try:
        start = time.monotonic()
        down = post(client)
        assert time.monotonic() - start < 10  # a refusal, not a hang on retries (~1 s on a quiet machine)
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/problem+json"
        assert "Redis" in down.json()["detail"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    finally:
        redis_server.start()
    assert post(client).status_code == 202  # same app, no restart


@pytest.mark.parametrize(
    ("changes", "status", "needle"),
    [
        ({"model": "nope"}, 404, "unknown model 'nope'"),
        ({"dataset": "nope"}, 404, "unknown dataset 'nope'"),
        ({"test": {"inputs": [[0.5] * 63], "targets": [1]}}, 422, "shape [64]"),
        ({"test": {"inputs": [[0.5] * 64], "targets": [12]}}, 422, "labels must lie in 0..9"),
        ({"test": {"inputs": [[0.5] * 64], "targets": [1.5]}}, 422, "integers"),
        ({"test": {"inputs": [[0.5] * 64]}}, 422, "required"),
        ({"test": {"inputs": [[2.0] * 64], "targets": [1]}}, 422, "[0.0, 1.0]"),
        ({"test": {"inputs": [[0.5] * 64, [0.5] * 3], "targets": [1, 2]}}, 422, "regular numeric array"),
        ({"test": {"inputs": [[0.5] * 64] * 300, "targets": [1] * 300}}, 413, "limit of 256"),
        ({"test": {"dataset": "digits-test", "indices": [5000]}}, 422, "out of range"),
        ({"test": {"dataset": "digits-test", "records": ["digits-test:99999"]}}, 404, "unknown record ids"),
        ({"test": {"dataset": "digits-test"}}, 422, "exactly one of"),
        ({"top_k": 500}, 422, "top_k=500"),
        ({"top_k": 0}, 422, "top_k"),
        ({"method": {"lr": -1}}, 422, "method.lr"),
        ({"method": {"optimizer": "rmsprop"}}, 422, "method.optimizer"),
        ({"method": {"unknown": 1}}, 422, "method.unknown"),
        ({"method": {"score": "cosine", "mode": "finite"}}, 422, "needs mode='linear'"),
        ({"method": {"precondition": "hessian", "damping": 0}}, 422, "needs damping > 0"),
        ({"method": {"params": ["head.*"]}}, 422, "'head.*' matches no parameter of model 'digits-mlp' (net.1.bias"),
        ({"method": {"damping": False}}, 422, "method.damping"),
        ({"method": {"precondition": "auto", "damping": 0}}, 422, "needs damping > 0"),
    ],
)
def test_errors_are_problem_json(client, changes, status, needle):
    response = post(client, **changes)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and needle in problem["detail"], problem


def test_more_errors_are_problem_json(client, settings):
    cases = [
        (
            client.post("/v1/attributions", content=b"{not json", headers={"content-type": "application/json"}),
            400,
        ),  # with where it breaks
        (
            client.post(
                "/v1/attributions",
                content=b"x" * (settings.max_body_bytes + 1),
                headers={"content-type": "application/json"},
            ),
            413,
        ),
        (client.get("/v1/attributions/unknown-id"), 404),
        (client.get("/v1/attributions/unknown-id/scores"), 404),
        (client.delete("/v1/attributions/unknown-id"), 404),
        (client.get("/v1/models/nope"), 404),
        (client.get("/v1/datasets/nope"), 404),
        (client.get("/v1/attributions/x", params={"top_k": 0}), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("path", ["/v1/attributions/a.b", "/v1/attributions/a%20b/scores", "/v1/analyses/%C3%A9"])
def test_an_id_outside_the_id_alphabet_is_a_422_not_a_500(client, path):
    response = client.get(path)
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"


def test_an_unsupported_method_is_a_405_with_allow(client):
    response = client.request("TRACE", "/healthz")
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_a_step_that_overflows_fails_the_job_and_says_what_to_change(client, worker):
    created = post(client, method={"lr": 100, "steps": 5, "mode": "finite", "precondition": "diag"})
    assert created.status_code == 202, created.text
    worker.work(burst=True)
    failed = client.get(created.headers["location"]).json()
    assert failed["status"] == "failed" and "not finite" in failed["error"] and "method.lr" in failed["error"]


def test_an_invalid_manifest_is_left_out_of_lists_and_a_503_by_id(client, settings, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from app.main import create_app

    root = tmp_path / "registry"
    shutil.copytree(settings.registry_dir, root)
    (root / "models" / "digits-mlp" / "model.toml").write_text("task = 'nonsense'\n")
    with TestClient(create_app(settings.model_copy(update={"registry_dir": root}))) as c:
        assert [m["id"] for m in c.get("/v1/models").json()] == ["digits-audit-mlp"]
        broken = c.get("/v1/models/digits-mlp")
        assert broken.status_code == 503 and "models/digits-mlp/model.toml" in broken.json()["detail"]
        assert str(tmp_path) not in broken.text  # no server path


def test_chunked_body_over_the_limit_is_refused(client, settings):
    def chunks():
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/attributions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


def test_job_payload_is_json_and_names_the_function(client, settings):
    post(client)
    raw = redis_lib.Redis.from_url(settings.redis_url)
    [job_id] = queued_jobs(settings)
    data = json.loads(zlib.decompress(raw.hget(f"rq:job:{job_id}", "data")))  # JSON, never a pickle
    assert data[0] == JOB_FUNC and data[2][0]["model"]["id"] == "digits-mlp"
    assert raw.hget(f"rq:job:{job_id}", "description").decode().startswith(JOB_FUNC)


def test_a_body_that_is_not_json_or_not_sent_as_json_says_what_to_fix(client):
    body = json.dumps({"model": "digits-mlp", "dataset": "digits-train", "test": TEST, "method": FAST})
    for headers in ({}, {"content-type": "text/plain"}):
        answer = client.post("/v1/attributions", content=body, headers=headers)
        assert answer.status_code == 415 and "content-type: application/json" in answer.json()["detail"]
        assert answer.headers["content-type"] == "application/problem+json"
    broken = client.post("/v1/attributions", content='{\n  "model": x\n}', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "line 2, column 12" in broken.json()["detail"]
    assert client.post("/v1/attributions", json=[1]).status_code == 422  # JSON, but not an object: the field's error


def test_only_training_records_are_called_memorised(client, worker):
    """digits-test:0 and :1 have near-zero loss (the engine treats them as it treats memorised points), but
    they are held out: the API says memorized only of training records."""
    held_out = post(client, test={"dataset": "digits-test", "indices": [0, 1]}).json()
    trained = post(client, test={"dataset": "digits-train", "indices": list(range(8))}).json()
    worker.work(burst=True)
    rows = {name: client.get(job["links"]["self"]).json()["result"]["rows"] for name, job in
            (("held_out", held_out), ("trained", trained))}  # fmt: skip
    assert [r["memorized"] for r in rows["held_out"]] == [False, False]
    assert all(r["test_loss"] < 1e-4 for r in rows["held_out"])  # what made them "memorised" before
    assert any(r["memorized"] for r in rows["trained"])
