"""What users touch, against a live service (uvicorn, a `python -m worker` process, a real redis-server):
the job's Server-Sent Events, the Python client (sync and async) and every CLI command."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import re
import shutil
import subprocess
import threading
import time
import typing
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from attribution_client import AsyncClient, Client, InvalidInput, NotFound, verify
from contract.indexes import TRUSTED_RECALL
from contract.kinds import AnalysisPublic
from contract.registry import Registry
from contract.schemas import AttributionPublic
from tests.conftest import wait_for
from tests.test_analyses import browse

pytestmark = pytest.mark.slow
BIG = {"model": "digits-mlp", "dataset": "digits-big"}
TEST = {"dataset": "digits-test", "indices": list(range(8))}
FINITE = {"mode": "finite", "optimizer": "adam", "precondition": "none"}  # ~seconds over digits-big, with progress
AUDIT = {"model": "digits-audit-mlp", "dataset": "digits-audit-train"}
ATTRIBUTION = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "attribution"


def events(base: str, url: str) -> list[tuple[str, dict]]:
    """A job's Server-Sent Events, parsed by hand (not by the client under test): (event, data) pairs."""
    got, event, data = [], None, None
    with httpx.stream("GET", f"{base}{url}/events", timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and event:
                got.append((event, data))
                event = None
    return got


def test_the_event_stream_delivers_progress_and_the_final_state(live):
    created = httpx.post(f"{live}/v1/attributions", json={**BIG, "test": TEST, "method": FINITE}).json()
    stream = events(live, created["links"]["self"])
    kinds = [e for e, _ in stream]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"progress"}, kinds
    final = AttributionPublic.model_validate(stream[-1][1])
    assert final.status == "finished" and len(final.result.rows) == 8
    done = [d["progress"]["done"] for e, d in stream if d["status"] == "running"]
    assert len(done) >= 2 and done == sorted(done) and done[-1] > done[0], done  # it moved, in order
    # a finished job's stream is its end at once; an unknown one a 404 problem before any stream
    assert [e for e, _ in events(live, created["links"]["self"])] == ["end"]
    missing = httpx.get(f"{live}/v1/attributions/nope/events")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_the_client_submits_follows_and_reads_results(live):
    seen = []
    with Client(live) as client:
        job = client.attribute(BIG["model"], BIG["dataset"], TEST, top_k=3, method=FINITE)
        assert job.status in ("queued", "running")
        job = client.wait(job, progress=seen.append)
        assert job.status == "finished" and [len(r.proponents) for r in job.result.rows] == [3] * 8
        assert [(r.test.dataset, r.test.index) for r in job.result.rows] == [("digits-test", i) for i in range(8)]
        assert job.result.rows[5].test.record_id == "digits-test:5"
        assert any(v.status == "running" and v.progress.done for v in seen) and seen[-1].status == "finished", [
            (v.status, v.progress) for v in seen
        ]
        scores = client.scores(job)
        assert scores.dtype == np.float32 and scores.shape == tuple(job.result.shape) == (8, 57_480)
        window = client.scores(job, rows="2:4", columns="100:300")
        np.testing.assert_array_equal(window, scores[2:4, 100:300])
        top = job.result.rows[0].proponents[0]
        assert scores[0, top.index] == pytest.approx(top.score, rel=1e-6) == scores[0].max()  # (40 copies tie)
        page = client.scores_page(job, rows="0:1", columns=":10")
        assert page.columns == [0, 10] and page.scores[0] == pytest.approx(scores[0, :10].tolist())
        again = client.attribute(BIG["model"], BIG["dataset"], TEST, top_k=3, method=FINITE)
        assert again.cached and again.id == job.id  # served from the earlier computation
        assert client.job(job.id).cached is False  # fetched after finishing: not "cached"
        assert job.id in [j.id for j in client.jobs()]
        assert "digits-mlp" in [m.id for m in client.models()] and client.model("digits-mlp").id == "digits-mlp"
        assert "digits-big" in [d.id for d in client.datasets()]
        assert "<html" in client.report(job).lower()
        with pytest.raises(NotFound):
            client.job("no-such-job")
        with pytest.raises(InvalidInput) as refused:
            client.attribute("digits-mlp", "digits-big", {"inputs": [[1.0, 2.0]]})
        assert refused.value.status == 422 and refused.value.detail
        assert client.cancel(job) is None  # an ended job: deleted
        with pytest.raises(NotFound):
            client.job(job)


def test_the_async_client_follows_a_job_and_runs_an_analysis(live):
    async def main():
        async with AsyncClient(live) as client:
            job = await client.attribute(BIG["model"], BIG["dataset"], TEST, method=FINITE)
            running = await client.cancel(job)  # a queued or running job: canceled for this tenant
            assert running.status == "canceled"
            leak = await client.leakage(
                AUDIT["model"], AUDIT["dataset"], {"dataset": "digits-audit-test", "indices": [0]}
            )
            return await client.wait(leak), [j.id async for j in client.jobs()]

    analysis, ids = asyncio.run(main())
    assert isinstance(analysis, AnalysisPublic) and analysis.status == "finished", analysis.error
    assert analysis.kind == "leakage"
    assert analysis.id in ids and len(analysis.result.rows) == 1


def cli(*args: str, base: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user would run it."""
    env = {"ATTR_URL": base, "PATH": str(ATTRIBUTION.parent), "COLUMNS": "200"}
    return subprocess.run([str(ATTRIBUTION), *args], capture_output=True, text=True, timeout=180, env=env)


def test_the_cli_exits_3_when_the_job_it_follows_is_canceled(live):
    args = [*BIG.values(), "--test-dataset", "digits-test", "--indices", "20,21", "--method", json.dumps(FINITE)]
    env = {"ATTR_URL": live, "PATH": str(ATTRIBUTION.parent)}
    followed = subprocess.Popen([str(ATTRIBUTION), "attribute", *args], env=env, stderr=subprocess.DEVNULL)
    with Client(live) as client:
        running = wait_for(lambda: next(client.jobs(status="running"), None), timeout=60, interval=0.1)
        assert client.cancel(running.id).status == "canceled"
    assert followed.wait(60) == 3


def test_every_cli_command_end_to_end(live, tmp_path, registry_dir):
    run = cli("attribute", *BIG.values(), "--test-dataset", "digits-test", "--indices", "0,1", "--top-k", "2",
              "--method", json.dumps(FINITE), "--json", base=live)  # fmt: skip
    assert run.returncode == 0, run.stderr
    job = AttributionPublic.model_validate_json(run.stdout)
    assert job.status == "finished" and [len(r.proponents) for r in job.result.rows] == [2, 2]

    points = tmp_path / "points.npy"
    np.save(points, np.zeros((1, 64), np.float32))
    np.save(tmp_path / "labels.npy", np.array([3]))
    run = cli("attribute", "digits-mlp", "digits-train", "--inputs", str(points), "--targets",
              str(tmp_path / "labels.npy"), "--method", json.dumps(FINITE), base=live)  # fmt: skip
    assert run.returncode == 0 and "proponent" in run.stdout and "finished" in run.stdout, run.stderr
    inline = cli("jobs", "list", "--json", "--limit", "1", base=live)
    point = cli("jobs", "show", json.loads(inline.stdout)[0]["id"], "--json", base=live)
    canonical = json.dumps([[0.0] * 64, 3], separators=(",", ":")).encode()  # an inline point's echo
    assert json.loads(point.stdout)["result"]["rows"][0]["test"]["digest"] == hashlib.sha256(canonical).hexdigest()

    audit = [*AUDIT.values()]
    for args in (
        ["leakage", *audit, "--test-dataset", "digits-audit-test", "--indices", "0,1"],
        [
            "mislabeled",
            *audit,
            "--reference-dataset",
            "digits-audit-test",
            "--indices",
            "60,61,62",
            "--method",
            '{"precondition": "none"}',
        ],  # fmt: skip
        ["memorization", *audit, "--indices", "0,1", "--method", '{"precondition": "none"}'],
    ):
        run = cli(*args, "--json", base=live)
        assert run.returncode == 0, (args[0], run.stderr)
        analysis = AnalysisPublic.model_validate_json(run.stdout)
        assert analysis.kind == args[0]
    shown = cli("jobs", "show", analysis.id, "--json", base=live)  # an analysis, found by its id alone
    assert shown.returncode == 0 and json.loads(shown.stdout)["kind"] == "memorization"

    listed = cli("jobs", "list", "--json", base=live)
    assert listed.returncode == 0 and job.id in [j["id"] for j in json.loads(listed.stdout)]
    shown = cli("jobs", "show", job.id, "--json", base=live)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job.id
    report = cli("report", job.id, "-o", str(tmp_path / "r.html"), base=live)
    assert report.returncode == 0 and "<html" in (tmp_path / "r.html").read_text().lower()
    assert cli("jobs", "cancel", job.id, base=live).stdout.strip() == f"{job.id} deleted"
    models = cli("models", "list", base=live)
    assert models.returncode == 0 and "digits-mlp" in models.stdout
    assert json.loads(cli("models", "show", "digits-mlp", base=live).stdout)["id"] == "digits-mlp"
    assert "digits-big" in cli("datasets", "list", base=live).stdout

    # registration: a model folder and a dataset's shards uploaded, a worker's dry run, then deletion
    mlp = Registry(registry_dir).model("digits-mlp")
    (tmp_path / "mlp").mkdir()
    shutil.copyfile(mlp.path / mlp.weights, tmp_path / "mlp" / "weights.safetensors")
    fields = {"task": "classification", "input": mlp.input.model_dump(exclude_none=True), "params": mlp.params}
    made = cli("models", "register", "mlp-copy", str(tmp_path / "mlp"), "--architecture", mlp.architecture,
               "--fields", json.dumps(fields), base=live)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["probe"]["parameter_count"] == sum(
        a.size for a in load_file(mlp.path / mlp.weights).values()
    )
    np.save(tmp_path / "few.npy", np.zeros((5, 64), np.float32))
    np.save(tmp_path / "few.targets.npy", np.arange(5))
    data = cli("datasets", "register", "few", str(tmp_path / "few.npy"), str(tmp_path / "few.targets.npy"),
               "--input", json.dumps(fields["input"]), base=live)  # fmt: skip
    assert data.returncode == 0 and json.loads(data.stdout)["dataset"]["size"] == 5, data.stderr
    run = cli("attribute", "mlp-copy", "few", "--test-dataset", "few", "--indices", "0", "--json", base=live)
    assert run.returncode == 0 and AttributionPublic.model_validate_json(run.stdout).status == "finished"
    assert cli("models", "delete", "mlp-copy", base=live).returncode == 0
    assert cli("models", "show", "mlp-copy", base=live).returncode == 4
    pickle = tmp_path / "pickled"
    pickle.mkdir()
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    refused = cli("models", "register", "pickled", str(pickle), "--architecture", "builtin:mlp", base=live)
    assert refused.returncode == 4 and "pickle" in refused.stderr

    # documented exit codes: 3 canceled (by someone else while followed), 4 refused, 5 unreachable
    no_wait = cli("attribute", *BIG.values(), "--test-dataset", "digits-test", "--indices", "9",
                  "--method", json.dumps(FINITE), "--no-wait", "--json", base=live)  # fmt: skip
    assert no_wait.returncode == 0 and json.loads(no_wait.stdout)["status"] in ("queued", "running")
    refused = cli("attribute", "no-such-model", "digits-train", "--test-dataset", "digits-test", "--indices", "0",
                  base=live)  # fmt: skip
    assert refused.returncode == 4 and "404" in refused.stderr
    assert cli("models", "list", base="http://127.0.0.1:9").returncode == 5


def test_the_docs_pages_render_offline_in_chromium(live, tmp_path):
    """Swagger UI and ReDoc with every host but this one unresolvable: their assets are the service's."""
    offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    for page, rendered in (("docs", 'class="opblock-summary-path"'), ("redoc", "follow_attribution")):
        dom = browse(f"{live}/{page}", tmp_path, offline, "--virtual-time-budget=15000", "--dump-dom")
        assert rendered in dom.stdout and "/v1/attributions/{attribution_id}/events" in dom.stdout, dom.stderr[-2000:]


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on a free port: records every delivery; answers 500 to the first `fail` ones."""

    def __init__(self, fail: int):
        self.fail, self.got = fail, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N802
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                self.got.append((time.monotonic(), dict(handler.headers), body))
                handler.send_response(500 if len(self.got) <= self.fail else 204)
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def test_a_webhook_gets_one_signed_delivery_per_job_with_retries(live):
    secret = "s3cret-of-16-chars"
    failing, ok = Receiver(fail=1), Receiver(fail=0)
    try:
        with Client(live) as client:
            hook = {"url": failing.url, "secret": secret}
            job = client.attribute(*BIG.values(), TEST, method=FINITE, webhook=hook)
            final = client.wait(job)
            wait_for(lambda: len(failing.got) >= 2, timeout=30)
            time.sleep(2.5)  # would a third (a second success) come? it must not
            (t1, _, first), (t2, headers, body) = failing.got
            assert len(failing.got) == 2 and first == body and 0.8 < t2 - t1 < 5  # retried once, ~1 s later
            assert verify(secret, body, headers["X-Attribution-Signature"])
            assert not verify("another-secret-16", body, headers["X-Attribution-Signature"])
            delivered = AttributionPublic.model_validate_json(body)
            assert delivered.id == job.id and delivered.status == "finished" == final.status
            assert delivered.result == final.result

            # a request that joins an ended job is called back at once; an analysis too
            leak = client.leakage(*AUDIT.values(), {"dataset": "digits-audit-test", "indices": [0]})
            client.wait(leak)
            client.leakage(*AUDIT.values(), {"dataset": "digits-audit-test", "indices": [0]},
                           webhook={"url": ok.url, "secret": secret})  # fmt: skip
            wait_for(lambda: ok.got, timeout=10)
            assert json.loads(ok.got[0][2])["kind"] == "leakage" and verify(
                secret, ok.got[0][2], ok.got[0][1]["X-Attribution-Signature"]
            )
            with pytest.raises(
                InvalidInput, match="ATTR_WEBHOOK_HOSTS"
            ):  # the service calls no host it was not allowed
                client.attribute(*BIG.values(), TEST, webhook={"url": "http://10.0.0.1/hook", "secret": secret})
    finally:
        for receiver in (failing, ok):
            receiver.shutdown()
            receiver.server_close()


def test_the_client_builds_an_index_and_asks_two_stage(live):
    linear = {"precondition": "none"}  # the gradient dot product: no curvature to estimate, a quick sweep
    test = {"dataset": "digits-test", "indices": [0]}
    with Client(live) as client:
        building = client.create_index(*BIG.values(), method=linear, dims=128, rank=0)
        index = wait_for(lambda: (i := client.index(building.id)).status == "finished" and i, timeout=300)
        assert index.index.records == 57_480 and index.index.settings.dims == 128 and index.index.recall is not None
        assert [i.id for i in client.indexes()] == [index.id]
        job = client.wait(client.attribute(*BIG.values(), test, method=linear, candidates=500))
        assert job.result.index.index == index.id and job.result.index.candidates == 500
        assert 500 <= job.result.index.rescored <= 1000
        by_default = client.wait(client.attribute(*BIG.values(), test, method=linear))  # used when it proved itself
        assert (by_default.result.index is not None) == (index.index.recall >= TRUSTED_RECALL)
        client.delete_index(index.id)
        with pytest.raises(NotFound):
            client.index(index.id)


def test_the_cli_prints_each_answer_as_a_table_writes_its_export_and_says_what_to_fix(live, tmp_path):
    audit = [*AUDIT.values()]
    leak = cli("leakage", *audit, "--test-dataset", "digits-audit-test", "--indices", "0-2",
               "--out", str(tmp_path / "leak.csv"), base=live)  # fmt: skip
    review = cli("mislabeled", *audit, "--reference-dataset", "digits-audit-test", "--indices", "60,61,62",
                 "--method", '{"precondition": "none"}', "--out", str(tmp_path / "review.jsonl"), base=live)  # fmt: skip
    assert leak.returncode == review.returncode == 0, leak.stderr + review.stderr
    with Client(live) as client:
        found = {j.kind: j for j in client.jobs() if j.kind in ("leakage", "mislabeled")}
        leakage, mislabeled = (client.job(found[k].id, k) for k in ("leakage", "mislabeled"))
        assert (tmp_path / "leak.csv").read_text() == client.export(leakage, format="csv")
        assert (tmp_path / "review.jsonl").read_text() == client.export(mislabeled, format="jsonl")
    assert len(leakage.result.rows) == 3 and leakage.result.summary[:40] in leak.stdout  # 0-2: three points
    assert all(row.best.record_id in leak.stdout and row.test.record_id in leak.stdout for row in leakage.result.rows)
    for suspect in mislabeled.result.review:  # every item of the review list, with the label the model believes
        cells = (suspect.record_id, suspect.index, suspect.label, suspect.predicted)  # in the table's order
        assert re.search("[ │]+".join(map(str, cells)) + " ", review.stdout), suspect

    shown = cli("jobs", "show", mislabeled.id[:6], base=live)  # a unique prefix
    assert shown.returncode == 0 and mislabeled.id in shown.stdout and "predicted" in shown.stdout, shown.stderr
    assert cli("jobs", "show", "", base=live).returncode == 2  # every id starts with "": not unique
    unknown = cli("jobs", "show", "zzzz", "--kind", "attribution", base=live)
    assert unknown.returncode == 4 and "no attribution of this tenant" in unknown.stderr

    # 64 test points over digits-big: running long after `jobs show` starts (canceled after it)
    body = [*BIG.values(), "--test-dataset", "digits-test", "--indices", "0-63", "--method", json.dumps(FINITE)]
    queued = json.loads(cli("attribute", *body, "--no-wait", "--json", base=live).stdout)
    with Client(live) as client:
        wait_for(lambda: client.job(queued["id"]).progress.total, timeout=60, interval=0.05)
        running = cli("jobs", "show", queued["id"], base=live)
        client.cancel(queued["id"])
    assert re.search(r"running: [\d,]+/[\d,]+ batches \(\d+%\)", running.stdout), running.stdout

    for args, says in (
        (["--indices", "0-x"], "whole numbers"),
        (["--indices", "0", "--method", "precondition=ekfac"], "a JSON object"),
        (["--indices", "0", "--method", '{"precondtion": "ekfac"}'], "precondtion"),
        (["--indices", "0", "--out", "table.xlsx"], ".csv or .jsonl"),
    ):
        wrong = cli("attribute", *BIG.values(), "--test-dataset", "digits-test", *args, base=live)
        assert wrong.returncode == 2 and says in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr
    missing = cli("attribute", *BIG.values(), "--inputs", str(tmp_path / "missing.npy"), base=live)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr


def test_every_client_operation_says_what_it_returns():
    """An operation is typed once, as the Call it makes (Call[T]): Client's returns T, AsyncClient's an
    awaitable of T (attribution_client.client.operation; mypy reads both)."""
    from attribution_client import client as module

    operations = {name: op for name, op in vars(module._Operations).items() if isinstance(op, module.operation)}
    assert {"attribute", "leakage", "job", "cancel", "scores", "export", "create_index"} <= set(operations)
    for name, op in operations.items():
        returns = typing.get_type_hints(op.build, vars(module))["return"]
        assert typing.get_origin(returns) is module.Call and typing.get_args(returns)[0] is not typing.Any, name
