"""One request, one resolution, over HTTP with a real redis-server and warm workers drained in-process:
the identity covers every input of a result, the documented precedence holds at POST, the result says
what actually ran, and job states are RQ's own."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import redis as redis_lib
import torch
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from safetensors.torch import load_file, save_file

from contract.registry import Registry

TEST = {"dataset": "digits-test", "indices": [0, 1]}
FAST = {"precondition": "none"}


@pytest.fixture
def root(registry_dir, tmp_path):
    """A private copy of the demo registry, for tests that change it."""
    path = tmp_path / "registry"
    shutil.copytree(registry_dir, path)
    return path


def service(settings, root, **changes):
    """(API client, in-process worker) on `root` with settings `changes`."""
    from app.main import create_app
    from worker.__main__ import WarmWorker

    own = settings.model_copy(update={"registry_dir": root, **changes})
    return TestClient(create_app(own)), WarmWorker(own, name=f"worker-{len(changes)}-{id(own)}")


def finished(client, worker, path: str, body: dict) -> dict:
    created = client.post(path, json=body)
    assert created.status_code == 202, created.text
    worker.work(burst=True)
    done = client.get(created.headers["location"]).json()
    assert done["status"] == "finished", done
    return done


def attribution(**changes) -> dict:
    return {"model": "digits-mlp", "dataset": "digits-train", "test": TEST, "method": FAST, **changes}


def test_a_changed_test_dataset_is_a_new_request(settings, root):
    client, worker = service(settings, root)
    with client:
        first = finished(client, worker, "/v1/attributions", attribution())
        assert first["cached"] is False  # fetched after finishing is not "cached"
        again = client.post("/v1/attributions", json=attribution())
        assert again.status_code == 200 and again.json()["cached"] is True
        # the operator replaces digits-test by the same images in another order: same id, new digest
        registry = Registry(root)
        test = registry.dataset("digits-test")
        data = load_file(test.path / test.shards[0].file)
        save_file({k: v.flip(0).contiguous() for k, v in data.items()}, root / "flipped.safetensors")
        registry.add_dataset("digits-test", [root / "flipped.safetensors"], test.input.model_dump())
        changed = client.post("/v1/attributions", json=attribution())
        assert changed.status_code == 202 and changed.json()["id"] != first["id"]  # no stale hit
        worker.work(burst=True)
        new = client.get(changed.headers["location"]).json()
    old_rows, new_rows = first["result"]["rows"], new["result"]["rows"]
    assert new_rows[0]["test_loss"] != pytest.approx(old_rows[0]["test_loss"])  # another image is test point 0


def test_a_float64_request_is_not_served_a_float32_result(settings, root):
    single, single_worker = service(settings, root)
    double, double_worker = service(settings, root, dtype="float64")
    with single, double:
        f32 = finished(single, single_worker, "/v1/attributions", attribution())
        created = double.post("/v1/attributions", json=attribution())
        assert created.status_code == 202 and created.json()["id"] != f32["id"]
        double_worker.work(burst=True)
        f64 = double.get(created.headers["location"]).json()
        assert single.post("/v1/attributions", json=attribution()).json()["execution"]["dtype"] == "float32"
        s32 = np.array(single.get(f32["links"]["scores"]).json()["scores"])
        s64 = np.array(double.get(f64["links"]["scores"]).json()["scores"])
    assert f32["execution"]["dtype"] == "float32" and f64["execution"]["dtype"] == "float64"
    np.testing.assert_allclose(s64, s32, rtol=1e-3, atol=1e-5)  # the same scores, in float64


def test_a_model_defaulting_to_finite_steps_gets_a_working_mislabeled_analysis(settings, root):
    registry = Registry(root)
    audit = registry.model("digits-audit-mlp")
    registry.add_model(
        "audit-finite",
        audit.task,
        audit.architecture,
        audit.path / audit.weights,
        audit.input.model_dump(),
        audit.params,
        method={"mode": "finite", "optimizer": "adam", "lr": 1e-3},
    )
    body = {
        "model": "audit-finite",
        "dataset": "digits-audit-train",
        "reference": {"dataset": "digits-audit-test", "indices": list(range(40, 60))},
        "untrained": True,  # digits-audit-mlp's weights under another id, which the dataset's `trained` does not name
    }
    client, worker = service(settings, root)
    with client:
        created = client.post("/v1/analyses/mislabeled", json=body)
        assert created.status_code == 202, created.text
        method = created.json()["method"]  # resolved at POST: the analysis' preset over the model's defaults
        assert (method["mode"], method["score"], method["group"], method["optimizer"]) == (
            "linear",
            "cosine",
            True,
            "adam",
        )
        worker.work(burst=True)
        assert client.get(created.headers["location"]).json()["status"] == "finished"
        refused = client.post("/v1/analyses/mislabeled", json={**body, "method": {"mode": "finite"}})
    assert refused.status_code == 422 and "needs mode='linear'" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("leakage", {"test": TEST, "method": {"score": "match"}}, "method.score: the leakage analysis needs 'signed'"),
        ("leakage", {"test": TEST, "method": {"group": True}}, "method.group"),
        ("memorization", {"records": {"dataset": "digits-train", "indices": [0]}, "method": {"group": True}}, "group"),
        ("mislabeled", {"reference": TEST, "method": {"group": False}}, "method.group"),
        ("mislabeled", {"reference": TEST, "method": {"score": "abs"}}, "method.score"),
    ],
)
def test_an_analysis_refuses_settings_it_cannot_honour_at_post(client, path, body, needle):
    response = client.post(f"/v1/analyses/{path}", json={"model": "digits-mlp", "dataset": "digits-train", **body})
    assert response.status_code == 422 and needle in response.json()["detail"], response.text
    assert response.json()["errors"][0]["loc"][:2] == ["body", "method"]


def register_mlp(root, id: str, hidden: int) -> None:
    """A randomly initialised digits MLP 64-hidden-10 in the registry at `root`."""
    from worker.forward_inf import build

    torch.manual_seed(0)
    params = {"in_features": 64, "hidden": [hidden], "out_features": 10}
    save_file({k: v.contiguous() for k, v in build("mlp", params).state_dict().items()}, root / f"{id}.safetensors")
    spec = Registry(root).model("digits-mlp").input.model_dump()
    Registry(root).add_model(id, "classification", "builtin:mlp", root / f"{id}.safetensors", spec, params)


def test_the_result_says_what_ran_after_auto_fell_back(settings, root):
    register_mlp(root, "digits-huge", 320)  # 24,010 parameters: over the whole Hessian's budget
    client, worker = service(settings, root)
    with client:
        body = {**attribution(model="digits-huge", untrained=True), "method": {}}  # a random MLP, not digits-train's
        done = finished(client, worker, "/v1/attributions", body)
    assert done["method"]["precondition"] == "auto" and done["method"]["params"] == ["*"]  # what was asked
    ran = done["execution"]
    assert ran["method"]["precondition"] == "lowrank"
    assert ran["parameters"] == ran["method"]["params"] == ["net.3.weight", "net.3.bias"]
    assert ran["parameter_count"] == 320 * 10 + 10
    assert ran["curvature"]["kind"] == "lowrank" and ran["curvature"]["samples"] == 1437
    assert any("last layer" in note for note in ran["notes"])


def test_a_job_whose_engine_raises_fails_once_with_that_message(settings, root):
    register_mlp(root, "digits-huge", 320)  # 24,010 parameters: over the exact Hessian's limit
    client, worker = service(settings, root)
    with client:
        created = client.post(
            "/v1/attributions",
            json=attribution(model="digits-huge", method={"precondition": "hessian"}, untrained=True),
        )
        assert created.status_code == 202, created.text
        worker.work(burst=True)
        failed = client.get(created.headers["location"]).json()
    assert failed["status"] == "failed"
    assert (
        failed["error"].startswith("precondition='hessian' needs a 24010 x 24010 matrix")
        and "Traceback" not in failed["error"]
    )
    assert worker.context.stats["jobs"] == 1  # a deterministic error is not retried
    key = redis_lib.Redis.from_url(settings.redis_url).hget(settings.key("handle", failed["id"]), "key").decode()
    job = Job.fetch(key, connection=redis_lib.Redis.from_url(settings.redis_url), serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED  # RQ's own state
