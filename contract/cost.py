"""Admission by cost: a request's work in worker-seconds, estimated at the door (app/jobs.py) from what the
workers measured sweeping the same model with the same method (worker/jobs.py), and what is done with it:

    estimate <= long_job_s                  it runs as usual
    long_job_s < estimate <= job_timeout_s  it waits on the `long` queues, which a worker takes only when
                                            no other work waits (so long work never starves short work)
    estimate > job_timeout_s                refused (422): it would run past the job time limit; the answer
                                            gives the estimate and what makes the request cheaper
    a tenant's queued and running estimates past tenant_budget_s: refused (429) until some of them end

    fi:cost:<model digest>:<dtype>   HASH  method id -> seconds per record-row of the sweep, a moving
                    average (`cost_key`, `method_id`): the sweep scores each row (a test point, or a record an
                    analysis adds to calibrate) on each training record it covers

The method decides the cost more than anything (the default sweeps a planned subset of layers on cached
inputs; leakage's finite step runs the whole model), so the rate is the method's; a method not measured
on the model yet is priced at the model's highest rate. A worker's warm-up measures the attribution and
leakage presets of each model it prepares (about a second of sweep each, 16 rows, after the first batch:
one row sweeps faster per row than many, and the first batch chooses how rows stack); every full sweep
measures again. Measured: 10.3 s estimated for a 13.8 s leakage run of the text model (docs/benchmarks.md,
"Admission by cost"): good enough to choose a queue. A model never measured has no estimate and runs as
usual.
"""

from __future__ import annotations

from .jobs import AttributionJob, InlinePoints, LeakageJob, ModelRef, digest
from .kinds import Job, calibration_rows
from .method import Method
from .settings import Settings

WEIGHT = 0.3  # the newest measurement's weight in the moving average


def cost_key(settings: Settings, model: ModelRef, dtype: str) -> str:
    return settings.key("cost", model.digest, dtype)


def method_id(method: Method) -> str:
    return digest(method.model_dump(mode="json"))[:16]


def work(job: Job, records: int) -> int | None:
    """Record-rows the request's sweeps cover (None: not priced by this rule, an index build): each row
    (test point, or calibration record) times the training records it is scored on: every one, or through
    an index its candidates at both ends (two-stage attribution sweeps their union for every row)."""
    if job.kind == "index":
        return None
    points = job.points
    rows = len(points.inputs) if isinstance(points, InlinePoints) else len(points.indices)
    rows += calibration_rows(job, records)
    if isinstance(job, AttributionJob) and job.index:
        return rows * min(records, 2 * job.candidates * rows)
    if isinstance(job, LeakageJob) and job.index:
        return rows * min(records, 2 * job.candidates)
    return rows * records


def cheaper(job: Job) -> str:
    """What makes this kind of request cheaper, for a refusal."""
    if job.kind == "attribution":
        return "ask for fewer test points, a cheaper method (mode 'linear'), or build an index and ask for `candidates`"
    if job.kind == "leakage":
        return "check fewer test points or calibration_records, or build an index of the dataset (POST /v1/indexes)"
    return "give fewer records, or a smaller reference or audit set"
