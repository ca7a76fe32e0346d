"""Admission by cost (contract/cost.py): a request priced at the door by the rate the workers measured on
its model, long work on the long queues behind short work, refusals with the estimate, and a cancel that
interrupts a batch that runs long."""

from __future__ import annotations

import pytest
import redis as redis_lib
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from contract.cost import cost_key, method_id, work
from contract.jobs import ModelRef
from contract.kinds import JOB, needs
from contract.method import MethodSettings, resolve_method
from contract.registry import Registry
from tests.conftest import start_worker, stop_worker, wait_for

TEST = {"dataset": "digits-test", "indices": [0]}
SHORT = {"model": "digits-mlp", "dataset": "digits-train", "test": TEST, "method": {"precondition": "none"}}


def payload(settings, view_id: str) -> tuple[dict, RQJob]:
    redis = redis_lib.Redis.from_url(settings.redis_url)
    key = redis.hget(settings.key("handle", view_id), "key").decode()
    job = RQJob.fetch(key, connection=redis, serializer=JSONSerializer)
    return JOB.validate_python(job.args[0]), job


def test_work_is_priced_by_the_measured_rate_and_long_work_waits_behind_short(client, worker, settings):
    redis = redis_lib.Redis.from_url(settings.redis_url)
    first = client.post("/v1/attributions", json=SHORT).json()
    assert first["admission"] is None  # the model was never measured: no estimate, it runs as usual
    worker.work(burst=True)
    job, _ = payload(settings, first["id"])
    key = cost_key(settings, job.model, job.dtype)
    rates = redis.hgetall(key)  # the sweep measured its method's rate, in seconds per record-row
    assert list(rates) == [method_id(job.method).encode()] and 0 < float(rates[method_id(job.method).encode()]) < 1

    # as if leakage's method had been measured at 1 ms per record-row (a slow host): 64 test points plus 32
    # calibration records over the 1,437 records, 138 s, past ATTR_LONG_JOB_S (120 s)
    leak = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test",
            "indices": list(range(64))}, "calibration_records": 32}  # fmt: skip
    leak_method = method_id(resolve_method(MethodSettings(), Registry(settings.registry_dir).model(
        "digits-mlp").method, needs("leakage")))  # fmt: skip
    units, slow = (64 + 32) * 1437, 1e-3
    redis.hset(key, leak_method, slow)
    long = client.post("/v1/analyses/leakage", json=leak)
    assert long.status_code == 202, long.text
    assert long.json()["admission"] == {"estimate_s": round(slow * units, 1), "long": True}
    long_job, rq_long = payload(settings, long.json()["id"])
    assert work(long_job, 1437) == units and method_id(long_job.method) == leak_method and ".long." in rq_long.origin
    short = client.post("/v1/attributions", json={**SHORT, "test": {"dataset": "digits-test", "indices": [1]}})
    assert short.json()["admission"]["long"] is False
    _, rq_short = payload(settings, short.json()["id"])

    worker.work(burst=True)  # the short request, enqueued after, runs first
    rq_long.refresh(), rq_short.refresh()
    assert rq_short.get_status() == rq_long.get_status() == JobStatus.FINISHED
    assert rq_short.started_at < rq_long.started_at
    assert float(redis.hget(key, leak_method)) < slow  # its sweep measured the real rate into the average

    # past the job time limit: refused with the estimate and what makes it cheaper
    redis.hset(key, leak_method, slow)
    settings.job_timeout_s = 100  # the app's own settings object
    refused = client.post("/v1/analyses/leakage", json={**leak, "calibration_records": 33})
    assert refused.status_code == 422 and "worker-seconds" in refused.json()["detail"]
    assert "ATTR_JOB_TIMEOUT_S" in refused.json()["detail"] and "fewer test points" in refused.json()["detail"]
    settings.job_timeout_s = 3600

    # the tenant's budget of estimated worker-seconds: a second queued request past it is a 429
    settings.tenant_budget_s = 200
    one = client.post("/v1/analyses/leakage", json={**leak, "calibration_records": 34})
    assert one.status_code == 202, one.text
    two = client.post("/v1/analyses/leakage", json={**leak, "calibration_records": 35})
    assert two.status_code == 429 and "ATTR_TENANT_BUDGET_S" in two.json()["detail"]
    assert two.headers["retry-after"]
    assert client.delete(one.json()["links"]["self"]).status_code == 202  # canceled: its budget is free again
    assert client.post("/v1/analyses/leakage", json={**leak, "calibration_records": 35}).status_code == 202


@pytest.mark.slow
def test_a_cancel_interrupts_a_batch_that_runs_long(api, big_settings):
    """A pass over the whole 57,480-record set in one batch, 16 rows at a time (about a second): the stop
    check between batches alone would wait for the batch's end; the worker interrupts it (jobs.interrupt,
    here at once: ATTR_STOP_WITHIN_S=0) once the sweep's first batch has ended, so the job stops inside its
    second batch."""
    worker = start_worker(big_settings, "interrupted", ATTR_BATCH_SIZE=100_000, ATTR_STOP_WITHIN_S=0)
    try:
        body = {"model": "digits-mlp", "dataset": "digits-big", "test": {"dataset": "digits-test",
                "indices": list(range(64))}, "method": {"mode": "finite", "precondition": "none"}}  # fmt: skip
        url = api.post("/v1/attributions", json=body).json()["links"]["self"]
        seen = wait_for(lambda: (v := api.get(url).json())["progress"]["done"] >= 1 and v, timeout=300)
        response = api.delete(url)
        assert response.status_code == 202
        _, computation = payload(big_settings, response.json()["id"])
        wait_for(lambda: computation.get_status() == JobStatus.STOPPED, timeout=60)
        assert computation.get_meta(refresh=True)["progress"]["done"] == seen["progress"]["done"]
        assert "interrupted mid-batch" in worker.log.read_text()  # inside the batch, not at its end
        assert worker.poll() is None  # and the worker stays up for the next job
        again = api.post("/v1/attributions", json={**body, "test": {"dataset": "digits-test", "indices": [0]}})
        wait_for(lambda: api.get(again.json()["links"]["self"]).json()["status"] == "finished", timeout=300)
    finally:
        stop_worker(worker)


def test_the_warm_up_measures_each_model_before_any_request(client, worker, settings):
    worker.warm_up()
    m = Registry(settings.registry_dir).model("digits-mlp")
    redis = redis_lib.Redis.from_url(settings.redis_url)
    rates = redis.hgetall(cost_key(settings, ModelRef(id=m.id, digest=m.digest), settings.dtype))
    presets = {
        method_id(resolve_method(MethodSettings(), m.method, needs(kind))) for kind in ("attribution", "leakage")
    }
    assert {f.decode() for f in rates} == presets and all(float(r) > 0 for r in rates.values())
    leak = {"model": "digits-mlp", "dataset": "digits-train", "test": {"dataset": "digits-test", "indices": [0]}}
    assert client.post("/v1/analyses/leakage", json=leak).json()["admission"]["estimate_s"] > 0
