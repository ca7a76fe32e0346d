"""The OpenAPI document against the live service: schemathesis (its CLI, as a user would run it) fuzzes
every operation of the API under uvicorn, with a worker, a real redis-server, the demo registry and an
API key, and finds no
server error, no undocumented status code, header or content type, and no response off its schema.

Not checked: that every schema-valid request is accepted (schemathesis' positive_data_acceptance): what
a request may say depends on the registry (a model's input shape, its dataset's record ids), which a
static schema cannot state; those answers are the documented 404s and 422s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, free_port, ready, subprocess_env, wait_for

pytestmark = pytest.mark.slow
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,unsupported_method,negative_data_rejection"
)


def test_schemathesis_finds_nothing(settings, tmp_path, capsys):
    from app.keys import main as keys_main

    keys = tmp_path / "keys.toml"
    assert keys_main(["--file", str(keys), "create", "--tenant", "fuzz", "--scopes", "read,submit"]) == 0
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
    uvicorn = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port), "--log-level", "error"]
    procs = [subprocess.Popen(uvicorn, cwd=ROOT, env=env)]
    procs.append(subprocess.Popen([PYTHON, "-m", "worker"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(base), timeout=60, interval=0.1)
        st = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [str(st), "run", f"{base}/openapi.json", "--checks", CHECKS, "--max-examples", "30", "--seed", "1"]
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
