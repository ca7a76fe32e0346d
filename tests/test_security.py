"""What an admin key, a manifest or a request can make a worker do: nothing outside the registry's families
and the operator's allowlist."""

from __future__ import annotations

import pytest
import torch
from conftest import queued_jobs
from safetensors.torch import save_file

from contract.registry import BUILTINS, FAMILIES, Registry, RegistryError
from worker.forward_inf import ZOO, build, families
from worker.store import Store
from worker.warm import Warm


def test_the_contract_names_the_engines_zoo_and_families():
    assert set(BUILTINS) == set(ZOO)
    assert set(FAMILIES) == set(families.FAMILIES)  # what registration may name, what a worker loads


@pytest.mark.parametrize("architecture", ["python:os:system", "python:subprocess:getoutput", "builtin:os"])
def test_registration_over_http_cannot_name_code(client, settings, registry_dir, tmp_path, architecture):
    """The reported repro: an admin registers `python:os:system` with a command; it is a 422 at the door,
    nothing reaches a worker and nothing runs."""
    marker = tmp_path / "marker"
    save_file(build("mlp", {"in_features": 4, "out_features": 2}).state_dict(), tmp_path / "w.safetensors")
    weights = (tmp_path / "w.safetensors").read_bytes()
    assert client.put("/v1/admin/models/evil/files/model.safetensors", content=weights).status_code == 201
    body = {"architecture": architecture, "task": "classification", "input": {"shape": [4]},
            "params": {"command": f"touch {marker}", "cmd": f"touch {marker}"}}  # fmt: skip
    for dry_run in (True, False):
        refused = client.post("/v1/admin/models/evil", json={**body, "dry_run": dry_run})
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    assert queued_jobs(settings) == []  # no probe was enqueued: no worker saw it
    assert not marker.exists()
    assert client.get("/v1/models/evil").status_code == 404


def test_operator_code_runs_only_from_allowed_modules(registry_dir, tmp_path, settings):
    """A manifest on disk (the operator's) may name python:module:factory; the worker imports it only when the
    module is in ATTR_PYTHON_ARCHITECTURES."""
    import redis

    registry = Registry(tmp_path / "registry")
    save_file(build("mlp", {"in_features": 4, "out_features": 2}).state_dict(), tmp_path / "w.safetensors")
    params = {"in_features": 4, "out_features": 2}
    m = registry.add_model("op", "classification", "python:worker.forward_inf.zoo:MLP", tmp_path / "w.safetensors",
                           {"shape": [4]}, params)  # fmt: skip
    store = Store(redis.Redis.from_url(settings.redis_url), settings)
    with pytest.raises(RegistryError, match="ATTR_PYTHON_ARCHITECTURES"):
        Warm(store, 1 << 20, torch.device("cpu")).load_model(m, torch.float32)
    allowed = Warm(store, 1 << 20, torch.device("cpu"), operator_modules=("worker.forward_inf.zoo",))
    model, _ = allowed.load_model(m, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 4 * 128 + 128 + 128 * 2 + 2


BODY = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]},
        "method": {"precondition": "none"}}  # fmt: skip


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/a\r\nX-Injected: 1", "http://127.0.0.1:9/a\tb", "http://127.0.0.1:9/\x00"]
)
def test_webhook_urls_with_control_characters_are_refused(client, url):
    answer = client.post("/v1/attributions", json={**BODY, "webhook": {"url": url, "secret": "s" * 16}})
    assert answer.status_code == 422 and "webhook" in answer.text


def test_webhook_targets_by_host_and_port_never_the_services_redis(client, settings):
    from urllib.parse import urlsplit

    from app.webhooks import check
    from contract.problems import InvalidInput
    from contract.schemas import Webhook

    redis = urlsplit(settings.redis_url)
    ports = settings.model_copy(update={"webhook_hosts": ["127.0.0.1:8099", "hooks.example"]})
    check(Webhook(url="http://127.0.0.1:8099/hook", secret="s" * 16), ports)
    check(Webhook(url="https://hooks.example:9443/hook", secret="s" * 16), ports)  # a bare host: any port
    for url in ("http://127.0.0.1:8100/hook", "http://10.0.0.1/hook"):
        with pytest.raises(InvalidInput):
            check(Webhook(url=url, secret="s" * 16), ports)
    everything = settings.model_copy(update={"webhook_hosts": ["*"]})
    with pytest.raises(InvalidInput, match="not allowed"):
        check(Webhook(url=f"http://{redis.hostname}:{redis.port}/", secret="s" * 16), everything)
    hook = {"url": f"http://127.0.0.1:{redis.port}/x", "secret": "s" * 16}  # the default list: loopback hosts
    assert client.post("/v1/attributions", json={**BODY, "webhook": hook}).status_code == 422


def test_a_model_on_a_dataset_it_did_not_train_on_is_refused_unless_intended(client, worker):
    other = {**BODY, "model": "digits-audit-mlp"}  # digits-train lists digits-mlp alone
    refused = client.post("/v1/attributions", json=other)
    assert refused.status_code == 422 and "untrained" in refused.json()["detail"]
    made = client.post("/v1/attributions", json={**other, "untrained": True})
    assert made.status_code == 202
    worker.work(burst=True)
    done = client.get(made.headers["location"]).json()
    assert done["status"] == "finished"
    assert any("not trained on 'digits-train'" in n for n in done["execution"]["notes"])


def test_reports_carry_a_strict_content_security_policy(client, worker):
    made = client.post("/v1/attributions", json=BODY)
    worker.work(burst=True)
    page = client.get(f"{made.headers['location']}/report")
    policy = page.headers["content-security-policy"]
    assert page.status_code == 200 and "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe" not in policy


def test_a_shard_whose_header_claims_more_than_its_file_holds_is_refused(client, tmp_path):
    import json
    import struct

    header = json.dumps({"inputs": {"dtype": "F32", "shape": [10**12, 64], "data_offsets": [0, 4 * 64 * 10**12]}})
    fake = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64
    assert client.put("/v1/admin/datasets/huge/files/part.safetensors", content=fake).status_code == 201
    body = {"input": {"shape": [64], "num_classes": 10}, "shards": ["part.safetensors"]}
    refused = client.post("/v1/admin/datasets/huge", json=body)
    assert refused.status_code == 422 and "past its" in refused.json()["detail"]


def test_staged_uploads_left_unregistered_expire(client, settings, registry_dir):
    import os
    import time

    assert client.put("/v1/admin/models/abandoned/files/notes.txt", content=b"x").status_code == 201
    staged = Registry(registry_dir).staging("model", "abandoned")
    old = time.time() - settings.staging_ttl_s - 60
    for path in (staged / "notes.txt", staged):
        os.utime(path, (old, old))
    assert client.put("/v1/admin/models/fresh/files/notes.txt", content=b"y").status_code == 201
    assert not staged.exists() and Registry(registry_dir).staging("model", "fresh").is_dir()
