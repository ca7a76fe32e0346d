"""An operator's own analysis kind (tests/example_kind.py, not shipped) adds itself with one module and one
setting: the API (uvicorn) and a worker process started with ATTR_ANALYSES serve it end to end, from its
route and schema to its table and report, with nothing else changed; without the setting it does not exist."""

from __future__ import annotations

import io
import json
import subprocess

import httpx
import numpy as np
import pytest

from attribution_client import Client
from tests.conftest import ROOT, free_port, ready, start_api, start_worker, stop_worker, subprocess_env, wait_for
from tests.test_client import ATTRIBUTION

KIND = ["tests.example_kind"]


@pytest.fixture
def extended(settings):
    """uvicorn and a worker, both with the example kind named in ATTR_ANALYSES. Yields the base URL."""
    port = free_port()
    env = subprocess_env(settings, ATTR_ANALYSES=json.dumps(KIND), ATTR_WARM_ON_START="false")
    api = start_api(env, port)
    worker = start_worker(settings, f"extended-{port}", ATTR_ANALYSES=json.dumps(KIND), ATTR_BATCH_SIZE=256)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), timeout=60, interval=0.1)
        yield base
    finally:
        api.kill()
        api.wait(10)
        stop_worker(worker)


def test_an_operators_kind_is_one_module_and_one_setting(extended):
    http = httpx.Client(base_url=extended, timeout=30)
    operation = http.get("/openapi.json").json()["paths"]["/v1/analyses/strongest"]["post"]
    assert operation["operationId"] == "create_strongest_analysis"
    body = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0, 1]}}
    refused = http.post("/v1/analyses/strongest", json={**body, "count": 0})  # its own schema's bounds
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
    pinned = http.post("/v1/analyses/strongest", json={**body, "method": {"group": True}})  # its own rules
    assert pinned.status_code == 422 and "the strongest analysis needs False" in pinned.json()["detail"]

    created = http.post("/v1/analyses/strongest", json={**body, "count": 4})
    assert created.status_code == 202, created.text
    url = created.headers["location"]
    view = wait_for(lambda: (v := http.get(url, params={"wait_s": 5}).json())["status"] in ("finished", "failed") and v)
    assert view["status"] == "finished", view.get("error")
    assert view["kind"] == "strongest" and view["method"]["mode"] == "linear"  # the attribution preset
    responders = view["result"]["responders"]
    assert [(r["row"], r["rank"]) for r in responders] == [(row, k) for row in (0, 1) for k in (1, 2, 3, 4)]

    # the worker's part computed them from the job's own score matrix: its 4 largest |score| per row
    scores = np.load(io.BytesIO(http.get(f"{url}/scores", params={"format": "npy"}).content), allow_pickle=False)
    assert scores.shape == (2, 1437)
    for row in (0, 1):
        mine = [r for r in responders if r["row"] == row]
        assert [r["index"] for r in mine] == np.argsort(-np.abs(scores[row]))[:4].tolist()
        assert [r["score"] for r in mine] == pytest.approx(scores[row, [r["index"] for r in mine]].tolist())

    csv = http.get(f"{url}/export", params={"format": "csv"}).text.splitlines()  # its table
    assert csv[0] == "row,rank,record_id,index,score" and len(csv) == 1 + 8
    page = http.get(f"{url}/report").text  # its report section, in the shared page
    assert "strongest responders" in page and responders[0]["record_id"] in page
    listed = http.get("/v1/jobs", params={"kind": "strongest"}).json()["items"]
    assert [j["kind"] for j in listed] == ["strongest"]

    # the CLI, where the same setting names it: the request checked against its schema, its table printed
    env = {"ATTR_URL": extended, "ATTR_ANALYSES": json.dumps(KIND), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    fields = json.dumps({"test": body["test"], "count": 4})
    shown = subprocess.run(
        [str(ATTRIBUTION), "analyze", "strongest", "digits-mlp", "digits-train", "--fields", fields],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "strongest responders" in shown.stdout and responders[0]["record_id"] in shown.stdout
    refused = subprocess.run(
        [str(ATTRIBUTION), "analyze", "strongest", "digits-mlp", "digits-train", "--fields", '{"count": 0}'],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "count" in refused.stderr


def test_the_shipped_service_has_no_such_kind(client):
    body = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]}}
    assert client.post("/v1/analyses/strongest", json=body).status_code in (404, 405)
    assert "/v1/analyses/strongest" not in client.get("/openapi.json").json()["paths"]
    assert client.get("/v1/jobs", params={"kind": "strongest"}).status_code == 422
    with pytest.raises(
        ValueError, match="unknown analysis kind 'strongest'"
    ):  # the client knows what this process does
        Client("http://127.0.0.1:1").analyze("strongest", "digits-mlp", "digits-train", test=body["test"])
