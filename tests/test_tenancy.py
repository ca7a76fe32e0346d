"""Safe to expose: API keys and scopes, tenants that cannot see, cancel or learn of each other's requests
(though they share the computation), the job list, delete, and quotas. Real redis-server, a worker
drained in-process, keys made with `python -m app.keys`."""

from __future__ import annotations

import time

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app.keys import main as keys_main
from contract.kinds import JobPage
from contract.schemas import AttributionPublic
from tests.conftest import queued_jobs

TEST = {"dataset": "digits-test", "indices": [0, 1]}
BODY = {"model": "digits-mlp", "dataset": "digits-train", "test": TEST, "method": {"precondition": "none"}}


def make_key(path, capsys, tenant: str, scopes: str) -> dict[str, str]:
    assert keys_main(["--file", str(path), "create", "--tenant", tenant, "--scopes", scopes]) == 0
    return {"authorization": f"Bearer {capsys.readouterr().out.strip()}"}


@pytest.fixture
def keys(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    made = {
        "a": make_key(path, capsys, "team-a", "read,submit"),
        "b": make_key(path, capsys, "team-b", "read,submit"),
        "reader": make_key(path, capsys, "team-a", "read"),
    }
    assert "sha256" in path.read_text() and made["a"]["authorization"][7:] not in path.read_text()  # hashed at rest
    return path, made


def app_with(settings, keys_path, **changes) -> TestClient:
    from app.main import create_app

    return TestClient(create_app(settings.model_copy(update={"api_keys_file": keys_path, **changes})))


def computation(settings, handle: str) -> Job:
    redis = redis_lib.Redis.from_url(settings.redis_url)
    key = redis.hget(settings.key("handle", handle), "key").decode()
    return Job.fetch(key, connection=redis, serializer=JSONSerializer)


def test_keys_and_scopes(settings, keys):
    path, key = keys
    with app_with(settings, path) as api:
        missing = api.post("/v1/attributions", json=BODY)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.headers["content-type"] == "application/problem+json"
        wrong = api.get("/v1/models", headers={"authorization": "Bearer fi_00000000_" + "0" * 64})
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["detail"]
        assert api.get("/v1/models", headers=key["reader"]).status_code == 200
        refused = api.post("/v1/attributions", json=BODY, headers=key["reader"])
        assert refused.status_code == 403 and "'submit' scope" in refused.json()["detail"]
        assert api.get("/healthz").status_code == 200  # liveness needs no key
        key_id = key["b"]["authorization"].split("_")[1]
        assert keys_main(["--file", str(path), "revoke", key_id]) == 0  # rotation: the file is read again
        assert api.get("/v1/models", headers=key["b"]).status_code == 401


def test_tenants_share_a_computation_but_not_its_handles(settings, keys, worker):
    path, key = keys
    with app_with(settings, path) as api:
        a = api.post("/v1/attributions", json=BODY, headers=key["a"])
        b = api.post("/v1/attributions", json=BODY, headers=key["b"])
        assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
        assert len(queued_jobs(settings)) == 1  # one job
        a_id, b_id = a.json()["id"], b.json()["id"]
        for method, path_ in (("GET", ""), ("GET", "/scores"), ("GET", "/report"), ("DELETE", "")):
            stranger = api.request(method, f"/v1/attributions/{a_id}{path_}", headers=key["b"])
            assert stranger.status_code == 404, (method, path_)  # as if it did not exist
        assert [j["id"] for j in api.get("/v1/jobs", headers=key["b"]).json()["items"]] == [b_id]

        # b lets go: a still wants it, so the computation goes on; a's view does not change
        canceled = api.delete(f"/v1/attributions/{b_id}", headers=key["b"])
        assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
        assert computation(settings, a_id).get_status() == JobStatus.QUEUED
        worker.work(burst=True)
        done = api.get(f"/v1/attributions/{a_id}", headers=key["a"]).json()
        assert done["status"] == "finished" and done["cached"] is False
        AttributionPublic.model_validate(done)
        assert api.get(f"/v1/attributions/{b_id}", headers=key["b"]).json()["status"] == "canceled"

        # b asks again: no sign that a asked (202, not cached), though the answer is ready; then b's own cache
        again = api.post("/v1/attributions", json=BODY, headers=key["b"])
        assert again.status_code == 202 and again.json()["cached"] is False and again.json()["status"] == "finished"
        repeat = api.post("/v1/attributions", json=BODY, headers=key["b"])
        assert repeat.status_code == 200 and repeat.json()["cached"] is True

        # a deletes its finished job: gone for a, still there for b, who holds it too; then b deletes it
        assert api.delete(f"/v1/attributions/{a_id}", headers=key["a"]).status_code == 204
        assert api.get(f"/v1/attributions/{a_id}", headers=key["a"]).status_code == 404
        assert api.get(f"/v1/attributions/{b_id}/scores", headers=key["b"]).status_code == 200
        assert api.delete(f"/v1/attributions/{b_id}", headers=key["b"]).status_code == 204
    redis = redis_lib.Redis.from_url(settings.redis_url)
    assert not list(redis.scan_iter(settings.key("result", "*"))) and not list(
        redis.scan_iter(settings.key("block", "*"))
    )


def test_a_cancel_stops_the_computation_when_no_tenant_wants_it(settings, keys):
    path, key = keys
    with app_with(settings, path) as api:
        created = api.post("/v1/attributions", json=BODY, headers=key["a"]).json()
        assert api.delete(created["links"]["self"], headers=key["a"]).json()["status"] == "canceled"
        assert computation(settings, created["id"]).get_status() == JobStatus.CANCELED  # RQ's own state


def test_the_job_list_pages_and_filters(settings, keys, worker):
    path, key = keys
    with app_with(settings, path) as api:
        ids = [
            api.post("/v1/attributions", json={**BODY, "test": {**TEST, "indices": [i]}}, headers=key["a"]).json()["id"]
            for i in range(3)
        ]
        leak = api.post("/v1/analyses/leakage", json={**BODY, "method": {}}, headers=key["a"]).json()["id"]
        first = api.get("/v1/jobs", params={"limit": 2}, headers=key["a"]).json()
        JobPage.model_validate(first)
        assert [j["id"] for j in first["items"]] == [leak, ids[2]] and first["next"]  # newest first
        rest = api.get("/v1/jobs", params={"limit": 2, "before": first["next"]}, headers=key["a"]).json()
        assert [j["id"] for j in rest["items"]] == [ids[1], ids[0]]
        kinds = api.get("/v1/jobs", params={"kind": "leakage"}, headers=key["a"]).json()["items"]
        assert [(j["id"], j["kind"]) for j in kinds] == [(leak, "leakage")]
        api.delete(f"/v1/attributions/{ids[0]}", headers=key["a"])
        worker.work(burst=True)
        finished = api.get("/v1/jobs", params={"status": "finished"}, headers=key["a"]).json()["items"]
        assert {j["id"] for j in finished} == {leak, ids[1], ids[2]}
        assert api.get("/v1/jobs", params={"status": "canceled"}, headers=key["a"]).json()["items"][0]["id"] == ids[0]


def test_quotas_answer_429_or_503_with_retry_after(settings, keys):
    path, key = keys
    variants = [{**BODY, "test": {**TEST, "indices": [i]}} for i in range(6)]
    with app_with(settings, path, submit_rate_per_minute=3) as api:
        codes = [api.post("/v1/attributions", json=v, headers=key["a"]).status_code for v in variants[:4]]
        limited = api.post("/v1/attributions", json=variants[4], headers=key["a"])
    assert codes[:3] == [202, 202, 202] and codes[3] == 429
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
    redis_lib.Redis.from_url(settings.redis_url).flushall()
    with app_with(settings, path, max_active_jobs_per_tenant=2) as api:
        codes = [api.post("/v1/attributions", json=v, headers=key["a"]).status_code for v in variants[:3]]
        assert codes == [202, 202, 429]
        assert api.post("/v1/attributions", json=variants[0], headers=key["a"]).status_code == 202  # joins its own
        assert api.post("/v1/attributions", json=variants[3], headers=key["b"]).status_code == 202  # another tenant
    redis_lib.Redis.from_url(settings.redis_url).flushall()
    with app_with(settings, path, max_queued_jobs=1) as api:
        assert api.post("/v1/attributions", json=variants[0], headers=key["a"]).status_code == 202
        full = api.post("/v1/attributions", json=variants[1], headers=key["b"])
    assert full.status_code == 503 and full.headers["retry-after"] == str(settings.retry_after_s)
    assert "queue is full" in full.json()["detail"]


def test_production_refuses_placeholder_secrets(settings, keys):
    from app.main import create_app

    with pytest.raises(RuntimeError, match="ATTR_SECRET"):
        create_app(settings.model_copy(update={"environment": "production", "api_keys_file": keys[0]}))
    with pytest.raises(RuntimeError, match="ATTR_API_KEYS_FILE"):
        create_app(settings.model_copy(update={"environment": "production", "secret": "s" * 32}))
    with pytest.raises(RuntimeError, match="at least 32 bytes"):
        create_app(settings.model_copy(update={"environment": "production", "api_keys_file": keys[0], "secret": "x"}))


def test_the_cap_holds_under_concurrent_posts(settings, keys):
    """300 different requests of one tenant, 64 at a time, against two API processes and no worker: the
    concurrency cap (16) admits exactly 16 computations (a count, then an add, once let 34 in)."""
    import asyncio
    import subprocess

    import httpx

    from tests.conftest import PYTHON, ROOT, free_port, subprocess_env, wait_for

    path, key = keys
    port = free_port()
    env = subprocess_env(settings, ATTR_API_KEYS_FILE=path, ATTR_SUBMIT_RATE_PER_MINUTE=10_000)
    uvicorn = [PYTHON, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port), "--workers", "2",
               "--log-level", "error"]  # fmt: skip
    api = subprocess.Popen(uvicorn, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), timeout=60, interval=0.1)

        async def flood():
            gate = asyncio.Semaphore(64)
            async with httpx.AsyncClient(base_url=base, timeout=60, headers=key["a"]) as client:

                async def one(i):
                    async with gate:
                        body = {**BODY, "test": {**TEST, "indices": [i % 360, (i + 1) % 360]}}
                        return (await client.post("/v1/attributions", json=body)).status_code

                return await asyncio.gather(*(one(i) for i in range(300)))

        codes = asyncio.run(flood())
    finally:
        api.terminate()
        api.wait(10)
    assert codes.count(202) == settings.max_active_jobs_per_tenant == 16, {c: codes.count(c) for c in set(codes)}
    assert codes.count(429) == 300 - 16
    assert len(queued_jobs(settings)) == 16


def _up(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_the_rate_is_per_tenant_and_answers_from_the_cache_are_not_counted(settings, keys, capsys, worker):
    path, key = keys
    other = make_key(path, capsys, "team-a", "read,submit")  # a second key of the same tenant
    # a method no other test asks for: work another test finished would answer at once, uncounted (202)
    method = {"precondition": "none", "lr": 0.000123}
    variants = [{**BODY, "method": method, "test": {**TEST, "indices": [i]}} for i in range(5)]
    with app_with(settings, path, submit_rate_per_minute=2) as api:
        assert api.post("/v1/attributions", json=variants[0], headers=key["b"]).status_code == 202
        worker.work(burst=True)  # with whatever earlier tests left queued: the minute starts after it
        if time.time() % 60 > 40:  # the rate counts per clock minute: not across its end
            time.sleep(60.5 - time.time() % 60)
        assert api.post("/v1/attributions", json=variants[1], headers=key["a"]).status_code == 202
        assert api.post("/v1/attributions", json=variants[2], headers=other).status_code == 202
        for _ in range(5):  # finished before (for another tenant): answered from the cache, not counted
            assert api.post("/v1/attributions", json=variants[0], headers=other).status_code in (200, 202)
        assert api.post("/v1/attributions", json=variants[3], headers=key["a"]).status_code == 429  # the tenant's 3rd
        assert api.post("/v1/attributions", json=variants[4], headers=key["b"]).status_code == 202  # another tenant


def test_a_broken_keys_file_is_a_503_with_retry_after(settings, keys):
    path, key = keys
    with app_with(settings, path) as api:
        path.write_text("[keys\nthis is not toml")
        answer = api.get("/v1/jobs", headers=key["a"])
    assert answer.status_code == 503 and answer.headers["retry-after"] and "keys file" in answer.json()["detail"]


def test_production_metrics_need_an_admin_key_and_docs_can_be_hidden(settings, keys, capsys):
    path, key = keys
    admin = make_key(path, capsys, "ops", "admin")
    production = {"environment": "production", "secret": "s" * 32}
    with app_with(settings, path, **production) as api:
        assert api.get("/metrics").status_code == 401
        assert api.get("/metrics", headers=key["a"]).status_code == 403
        assert api.get("/metrics", headers=admin).status_code == 200
    with app_with(settings, path, docs=False) as api:
        assert {api.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")} == {404}


def test_the_openapi_document_asks_for_a_key_only_where_keys_are_needed(settings, keys, client):
    def secured(spec: dict) -> set[bool]:
        return {
            "security" in op for path, ops in spec["paths"].items() if path.startswith("/v1/") for op in ops.values()
        }

    assert secured(client.get("/openapi.json").json()) == {False}  # development, no keys file: no key to give
    with app_with(settings, keys[0]) as api:
        spec = api.get("/openapi.json").json()
    assert secured(spec) == {True} and spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
