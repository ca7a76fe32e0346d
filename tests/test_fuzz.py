"""The OpenAPI document against the live service: schemathesis (its CLI, as a user would run it) runs every
check it has (`--checks all`) on every operation of the API under uvicorn, with a worker, a real
redis-server, a copy of the demo registry and a key of every scope, and finds no server error, no
undocumented status code, header, content type or Allow header, and no response off its schema.

One check is told what to expect (tests/schemathesis.toml): a schema-valid request may still be a 404,
409 or 422, since what it may name depends on the registry (a model's parameters, a dataset's record
ids, a result's columns), which a static schema cannot state."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, free_port, ready, start_api, subprocess_env, wait_for

pytestmark = pytest.mark.slow
CHECKS = "all"


def test_schemathesis_finds_nothing(settings, tmp_path, capsys):
    from app.keys import main as keys_main

    registry = tmp_path / "registry"  # its admin calls may delete what the schema's examples name
    shutil.copytree(settings.registry_dir, registry)
    settings = settings.model_copy(update={"registry_dir": registry})

    keys = tmp_path / "keys.toml"
    assert keys_main(["--file", str(keys), "create", "--tenant", "fuzz", "--scopes", "read,submit,admin"]) == 0
    key = capsys.readouterr().out.strip()
    port = free_port()
    env = subprocess_env(
        settings,
        ATTR_API_KEYS_FILE=keys,
        ATTR_MAX_WAIT_S=1,  # long polls end soon
        ATTR_JOB_TIMEOUT_S=60,  # a fuzzed method that would run for long is cut short
        ATTR_WARM_ON_START="false",
        ATTR_SUBMIT_RATE_PER_MINUTE=100_000,  # quotas have their own tests; here they would hide the rest
        ATTR_MAX_ACTIVE_JOBS_PER_TENANT=100_000,
    )
    procs = [start_api(env, port)]
    procs.append(subprocess.Popen([PYTHON, "-m", "worker"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), timeout=60, interval=0.1)
        st = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [
                str(st),
                "--config-file",
                str(ROOT / "tests" / "schemathesis.toml"),
                "run",
                f"{base}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                "30",
                "--seed",
                "1",
            ]
            + ["-H", f"Authorization: Bearer {key}", "--no-color", "--request-timeout", "20"],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,  # its cache (.schemathesis/) is this run's, not the checkout's
        )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    print(summary)
    assert run.returncode == 0, run.stdout[-20000:]
