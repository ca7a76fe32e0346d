"""What a user on a Docker host runs: the compose file parses and names things that exist."""

import re

import yaml

from tests.conftest import ROOT


def test_compose_file_names_files_and_targets_that_exist():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\w+)", dockerfile, flags=re.M))
    assert {"redis", "api", "worker"} <= set(compose["services"])
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
            assert build["target"] in stages, name
    assert "--appendonly" in compose["services"]["redis"]["command"]
    assert compose["services"]["redis"]["healthcheck"]["test"]
    for name in ("redis", "api", "worker"):  # kept alive, and checked
        assert compose["services"][name]["restart"] == "unless-stopped", name
        assert compose["services"][name]["healthcheck"]["test"], name
    assert "container_name" not in compose["services"]["worker"]  # `docker compose up --scale worker=N`
    api, worker = compose["services"]["api"], compose["services"]["worker"]  # one score store, shared
    assert api["environment"]["ATTR_SCORE_DIR"] == worker["environment"]["ATTR_SCORE_DIR"] == "/scores"
    assert "scores:/scores:ro" in api["volumes"] and "scores:/scores" in worker["volumes"]
    gpu = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for path in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / path).exists(), path
    # the API image holds the contract and the API only, and installs no torch; the worker image has torch
    stage = dict(re.findall(r"^FROM \S+ AS (\w+)\n((?:(?!FROM ).*\n?)*)", dockerfile, re.M))
    copied = {name: set(re.findall(r"^COPY (\S+) ", body, re.M)) for name, body in stage.items()}
    assert copied["api"] | copied["base"] == {"pyproject.toml", "contract", "app"}
    assert copied["worker"] | copied["base"] == {"pyproject.toml", "contract", "worker"}
    assert "torch" not in stage["api"] and "TORCH_SPEC" in stage["worker"]


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for script in ("./scripts/serve", "./scripts/test"):
        assert script in readme
        assert (ROOT / script).stat().st_mode & 0o111
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
