"""What an admin key, a manifest or a request can make a worker do: nothing outside the registry's families
and the operator's allowlist."""

from __future__ import annotations

import pytest
import torch
from conftest import queued_jobs
from safetensors.torch import save_file

from contract.registry import BUILTINS, Registry, RegistryError
from worker.forward_inf import ZOO, build
from worker.store import Store
from worker.warm import Warm


def test_the_contract_names_the_engines_zoo():
    assert set(BUILTINS) == set(ZOO)


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
