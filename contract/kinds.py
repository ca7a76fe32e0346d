"""The kinds of job a tenant submits, stated once: the attribution, and each analysis registered here as
an `AnalysisSpec`. The types that depend on the set of kinds (the payload union `Job`, the analysis
results' union, `AnalysisPublic`, the job listing) are built from the registry, after every kind is in.

An analysis kind gathers, in one spec: its request body (POST /v1/analyses/<kind>), its payload, its
result, its table, what it needs of the method, what evidence the worker gathers for it, and, by dotted
path (a process imports only its own part, so no import points the wrong way):

    resolve   API     (request, common, door) -> payload     (app/resolve.py: the door's checks and limits)
    report    API     (stored, scores, records, queries, top_k) -> its HTML section (app/report.py)
    compute   worker  (Evidence, payload) -> result          (worker/analyses)

The shipped kinds are registered below. An operator's own kind is one module that calls `register` (its
types and parts may live in that module too), named in ATTR_ANALYSES: every process imports it here, before
the unions are built (tests/example_kind.py is one; docs/extending.md says the steps).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

from . import tables
from .jobs import AttributionJob, IndexJob, JobBase, LeakageJob, MemorizationJob, MislabeledJob
from .method import ATTRIBUTION, PRESETS, Method, Needs
from .schemas import (
    JobCreate,
    JobPublic,
    LeakageCreate,
    LeakageResult,
    MemorizationCreate,
    MemorizationResult,
    MislabeledCreate,
    MislabeledResult,
    Status,
)
from .settings import Extensions

__all__ = [
    "ANALYSES",
    "JOB",
    "AnalysisKind",
    "AnalysisPublic",
    "AnalysisResult",
    "AnalysisSpec",
    "Job",
    "JobPage",
    "JobSummary",
    "Kind",
    "calibration_rows",
    "needs",
    "register",
    "table",
]


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis kind: everything about it that is not its computation's own code.

    Args:
        kind: its name: the route /v1/analyses/<kind>, the `kind` literal of its payload and result.
        create: its request body (a contract.schemas.JobCreate).
        job: its payload (a contract.jobs.JobBase with `kind` and `points`).
        result: its answer (a model with `kind` and `summary`).
        describe: what it answers, in a sentence or two (the route's description in the OpenAPI document).
        table: its answer as one flat table (exports, the CLI).
        method: its preset and the method values it can honour.
        resolve, report, compute: its parts in the API and the worker, as "module:function" (module docstring).
        calibrates: the worker adds `job.calibration_records` training records as queries (for thresholds).
        inputs: the worker gathers the training and test inputs (or texts) as Evidence (input similarity).
        calibrated: each part fits a calibration on the job's points and keeps the training records' class
            log-probabilities under it (Evidence.calibrated).
    """

    kind: str
    create: type[JobCreate]
    job: type[JobBase]
    result: type[BaseModel]
    describe: str
    table: tables.Table
    resolve: str
    report: str
    compute: str
    method: Needs
    calibrates: bool = False
    inputs: bool = False
    calibrated: bool = False

    def part(self, name: str) -> Callable[..., Any]:
        """Its part `name` ("resolve", "report", "compute"), imported where it is first used."""
        return _load(getattr(self, name))


@cache
def _load(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


ANALYSES: dict[str, AnalysisSpec] = {}


def register(spec: AnalysisSpec) -> AnalysisSpec:
    """Add an analysis kind; refused where its types do not name it, or the name is taken."""
    taken = {"attribution", "index", *ANALYSES}
    problems = [
        f"the name {spec.kind!r} is taken" if spec.kind in taken else "",
        *(
            f"{t.__name__}.kind must be Literal[{spec.kind!r}]"
            for t in (spec.job, spec.result)
            if t.model_fields.get("kind") is None or t.model_fields["kind"].default != spec.kind
        ),
        f"method.kind must be {spec.kind!r}" if spec.method.kind != spec.kind else "",
        f"unknown preset {spec.method.preset!r}" if spec.method.preset not in PRESETS else "",
        *(f"rule for unknown method field {f!r}" for f in spec.method.rules if f not in Method.model_fields),
    ]
    if any(problems):
        raise ValueError(f"analysis {spec.kind!r}: " + "; ".join(p for p in problems if p))
    ANALYSES[spec.kind] = spec
    return spec


register(
    AnalysisSpec(
        "leakage",
        LeakageCreate,
        LeakageJob,
        LeakageResult,
        "Which test points are present in the training set: per test point the closest training record, a "
        "calibrated leaked/not decision (threshold and calibration reported) and the 5 closest as evidence. Where "
        "the model and dataset have an index, any number of test points (up to ATTR_MAX_INDEX_TEST_POINTS), each "
        "confirmed against its most similar records.",
        tables.LEAKAGE,
        resolve="app.resolve:leakage",
        report="app.report:leakage",
        compute="worker.analyses.leakage:leakage",
        method=Needs(
            "leakage",
            "leakage",
            {
                "score": (("signed",), "it compares each record's raw response with the test point's own"),
                "group": ((False,), "it matches each test point on its own"),
            },
        ),
        calibrates=True,
        inputs=True,
    )
)
register(
    AnalysisSpec(
        "mislabeled",
        MislabeledCreate,
        MislabeledJob,
        MislabeledResult,
        "Training records ranked by how likely their label is wrong, a review list with its expected precision, "
        "and per-class summaries.",
        tables.MISLABELED,
        resolve="app.resolve:mislabeled",
        report="app.report:mislabeled",
        compute="worker.analyses.mislabeled:mislabeled",
        method=Needs(
            "mislabeled",
            "mislabeled",
            {
                "group": ((True,), "the clean reference set is one query"),
                "score": (("cosine", "signed", "relative"), "harm is a signed loss change of the reference set"),
            },
        ),
        calibrated=True,
    )
)
register(
    AnalysisSpec(
        "memorization",
        MemorizationCreate,
        MemorizationJob,
        MemorizationResult,
        "For each requested training record: how much the model relies on it (and its exact copies) for its own "
        "prediction versus its supporting neighbours; ranked, with outliers flagged.",
        tables.MEMORIZATION,
        resolve="app.resolve:memorization",
        report="app.report:memorization",
        compute="worker.analyses.memorization:memorization",
        method=Needs(
            "memorization",
            "attribution",
            {
                "score": (("signed",), "self-influence is a signed loss change"),
                "group": ((False,), "each audited record is its own query"),
            },
        ),
        calibrates=True,
    )
)
for _module in Extensions().analyses:  # an operator's kinds register themselves as they are imported
    importlib.import_module(_module)


def needs(kind: str) -> Needs:
    """What a job of `kind` needs of the method (contract.method.resolve_method)."""
    return ANALYSES[kind].method if kind in ANALYSES else ATTRIBUTION


def calibration_rows(job: JobBase, records: int) -> int:
    """Training records a job adds as calibration queries (`calibrates`), of a training set of `records`."""
    calibrates = job.kind in ANALYSES and ANALYSES[job.kind].calibrates
    return min(job.calibration_records, records) if calibrates else 0


def table(kind: str) -> tables.Table:
    """A kind's answer as one table (contract/tables.py)."""
    return ANALYSES[kind].table if kind in ANALYSES else tables.ATTRIBUTION


# -- the types built from the registry ---------------------------------------------------------------------
AnalysisKind = Literal[tuple(ANALYSES)]  # type: ignore[valid-type]
Kind = Literal[("attribution", *ANALYSES)]  # type: ignore[valid-type]
Job = Annotated[
    Union[(AttributionJob, IndexJob, *(s.job for s in ANALYSES.values()))],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="kind"),
]
JOB: TypeAdapter[Job] = TypeAdapter(Job)
AnalysisResult = Annotated[
    Union[tuple(s.result for s in ANALYSES.values())],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="kind"),
]


class AnalysisPublic(JobPublic):
    kind: AnalysisKind
    result: AnalysisResult | None = None


class JobSummary(BaseModel):
    id: str
    kind: Kind
    status: Status
    model: str
    dataset: str
    created: datetime
    links: dict[str, str]


class JobPage(BaseModel):
    """One page of a tenant's jobs, newest first."""

    items: list[JobSummary]
    next: str | None = Field(None, description="pass as `before` for the next page; null on the last")
