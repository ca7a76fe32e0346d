"""The user docs' code runs: every `bash` and `python` block of docs/quickstart.md, concepts.md and
operations.md, against a live service (uvicorn, a worker, a real redis-server). `shell` blocks start a
service, which the fixture has done; the docs' URL is swapped for the live one."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow
DOCS = ("quickstart.md", "concepts.md", "operations.md")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, int, str, str]]:
    found = []
    for name in DOCS:
        text = (ROOT / "docs" / name).read_text()
        found += [(name, i, m[1], m[2]) for i, m in enumerate(BLOCK.finditer(text))]
    return found


def test_the_docs_have_blocks_to_run():
    assert {name for name, *_ in blocks()} == set(DOCS)


def test_the_docs_code_blocks_run(live, tmp_path):
    env = {**os.environ, "ATTR_URL": live, "PATH": f"{os.path.dirname(PYTHON)}:{os.environ['PATH']}"}
    for name, i, language, code in blocks():
        code = code.replace("http://127.0.0.1:8000", live)
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [PYTHON, "-c", code]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (
            f"{name}, block {i} ({language}):\n{code}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        )
