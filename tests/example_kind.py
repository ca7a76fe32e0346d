"""An analysis kind that is not shipped: the strongest responders. For each test point, the `count` training
records whose loss moves most (either way) under its mirrored step. It shows what an operator's own kind
is: this one module, named in ATTR_ANALYSES (tests/test_extending.py runs the API and a worker with it).

Every process that imports the contract imports this module, so it imports only the contract at the top;
its API part (`resolve`, `report`) and its worker part (`compute`) import what they need where they run.
"""

from __future__ import annotations

import html
from typing import Literal

from pydantic import BaseModel, Field

from contract.jobs import JobBase, Points
from contract.kinds import AnalysisSpec, register
from contract.method import Needs
from contract.schemas import DatasetTest, InlineTest, JobCreate
from contract.tables import listed


class StrongestCreate(JobCreate):
    """The training records that respond most to each test point."""

    test: InlineTest | DatasetTest
    count: int = Field(3, ge=1, le=20, description="records per test point")


class StrongestJob(JobBase):
    kind: Literal["strongest"] = "strongest"
    test: Points
    count: int

    @property
    def points(self):
        return self.test


class Responder(BaseModel):
    row: int
    rank: int
    record_id: str
    index: int
    score: float


class StrongestResult(BaseModel):
    kind: Literal["strongest"] = "strongest"
    summary: str
    responders: list[Responder]


def resolve(request: StrongestCreate, common: dict, door) -> StrongestJob:  # the API's part
    from app.resolve import test_points

    test = test_points(request.test, door.registry, door.model, door.settings)
    return StrongestJob(test=test, count=request.count, **common)


def compute(evidence, job: StrongestJob) -> StrongestResult:  # the worker's part
    scores = evidence.scores[: evidence.n]  # (rows, N)
    top = scores.abs().topk(min(job.count, scores.shape[1]), dim=1).indices  # (rows, count)
    responders = [
        Responder(row=r, rank=k + 1, record_id=evidence.record_ids[i], index=i, score=float(scores[r, i]))
        for r, row in enumerate(top.tolist())
        for k, i in enumerate(row)
    ]
    summary = f"the {top.shape[1]} strongest responders of each of {len(top)} test points"
    return StrongestResult(summary=summary, responders=responders)


def report(result, scores, records, queries, top_k) -> str:  # the API's part: its section of the page
    items = "".join(
        f"<li>row {r.row}: {html.escape(r.record_id)} ({r.score:.3g})</li>" for r in result.analysis.responders
    )
    return f'<p class="answer">{html.escape(result.analysis.summary)}</p><ol>{items}</ol>'


register(
    AnalysisSpec(
        "strongest",
        StrongestCreate,
        StrongestJob,
        StrongestResult,
        "The training records whose loss moves most under each test point's mirrored step.",
        listed("responders", ("row", "rank", "record_id", "index", "score")),
        resolve=f"{__name__}:resolve",
        report=f"{__name__}:report",
        compute=f"{__name__}:compute",
        method=Needs("strongest", "attribution", {"group": ((False,), "each test point has its own responders")}),
    )
)
