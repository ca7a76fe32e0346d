"""`Client` (sync) and `AsyncClient` over httpx, typed with the service's own schemas (contract.schemas):
a request is checked before it is sent, an answer parsed into the model the API built it from, and a
problem+json answer raised as the ServiceError subclass of its status (contract/problems.py).

Each operation is defined once (`_Operations`: which request, how to read the answer, as a `Call[T]`); the
sync client runs it and returns T, the async one returns an awaitable of T, and both are typed so
(`operation`). Following a job (`wait`) reads the job's Server-Sent Events.
"""

from __future__ import annotations

import functools
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import httpx
import numpy as np

from contract.kinds import ANALYSES, AnalysisPublic, JobPage, JobSummary
from contract.problems import ServiceError
from contract.schemas import (
    AttributionCreate,
    AttributionPublic,
    DatasetPublic,
    DatasetRegistered,
    DatasetRegistration,
    IndexCreate,
    IndexPage,
    IndexPublic,
    JobPublic,
    ModelPublic,
    ModelRegistered,
    ModelRegistration,
    ScoresPage,
    UploadedFile,
)

__all__ = ["AsyncClient", "Client"]
Progress = Callable[[JobPublic], None]
T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class Call(Generic[T]):
    """One HTTP exchange: the request, and how its answer becomes a value."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict | None = None
    content: bytes | None = None
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


def _view(response: httpx.Response) -> JobPublic:
    data = response.json()
    return (AnalysisPublic if "kind" in data else AttributionPublic).model_validate(data)


def _analysis(kind: str, model: str, dataset: str, method: dict | None, **fields) -> Call[JobPublic]:
    if kind not in ANALYSES:
        raise ValueError(f"unknown analysis kind {kind!r}; known here: {', '.join(ANALYSES)} (ATTR_ANALYSES adds more)")
    body = ANALYSES[kind].create(model=model, dataset=dataset, method=method or {}, **fields)
    return Call("POST", f"/v1/analyses/{kind}", _view, body.model_dump(exclude_none=True))


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"status": response.status_code, "detail": response.text[:500]}
        raise ServiceError.from_problem(body, response.headers)
    return response


def _path(job: JobPublic | str, kind: str | None = None) -> str:
    if isinstance(job, str):
        return f"/v1/{'analyses' if kind not in (None, 'attribution') else 'attributions'}/{job}"
    return job.links["self"]


class _EventStream:
    """Server-Sent Events, line by line: `feed(line)` returns the job view an event carries, if complete."""

    def __init__(self, progress: Progress | None):
        self.progress, self.event, self.data = progress, "message", []

    def feed(self, line: str) -> tuple[str, JobPublic] | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        elif not line and self.data:
            data, event = "\n".join(self.data), self.event
            self.event, self.data = "message", []
            view = _view(httpx.Response(200, content=data.encode()))
            if self.progress is not None:
                self.progress(view)
            return event, view
        return None


class operation(Generic[P, T]):
    """A method defined once as the Call it makes: on a Client it returns the Call's value, on an
    AsyncClient an awaitable of it (each client's `_run`)."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]):
        self.build = build
        functools.update_wrapper(self, build)

    @overload
    def __get__(self, client: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client, owner=None):
        if client is None:
            return self
        build = self.build

        @functools.wraps(build)
        def run(*args, **kwargs):
            return client._run(build(client, *args, **kwargs))

        return run


class _Operations:
    """The service's operations, each the Call it makes; `_run` (sync or async) performs it."""

    @operation
    def attribute(
        self, model: str, dataset: str, test: dict, top_k: int = 10, method: dict | None = None, **options
    ) -> Call[JobPublic]:
        """Submit an attribution: the job's view (202: queued, running or already finished). `options`:
        the request's other fields, e.g. webhook={"url": ..., "secret": ...}."""
        body = AttributionCreate(model=model, dataset=dataset, test=test, top_k=top_k, method=method or {}, **options)
        return Call("POST", "/v1/attributions", _view, body.model_dump(exclude_none=True))

    @operation
    def leakage(self, model: str, dataset: str, test: dict, method: dict | None = None, **options) -> Call[JobPublic]:
        return _analysis("leakage", model, dataset, method, test=test, **options)

    @operation
    def mislabeled(
        self, model: str, dataset: str, reference: dict, method: dict | None = None, **options
    ) -> Call[JobPublic]:
        return _analysis("mislabeled", model, dataset, method, reference=reference, **options)

    @operation
    def memorization(
        self, model: str, dataset: str, records: dict, method: dict | None = None, **options
    ) -> Call[JobPublic]:
        return _analysis("memorization", model, dataset, method, records=records, **options)

    @operation
    def analyze(self, kind: str, model: str, dataset: str, method: dict | None = None, **fields) -> Call[JobPublic]:
        """Submit an analysis of any kind registered here (contract/kinds.py, ATTR_ANALYSES: an operator's
        own too), its request checked against the kind's schema before it is sent; `fields`: the request's."""
        return _analysis(kind, model, dataset, method, **fields)

    @operation
    def job(
        self, job: JobPublic | str, kind: str | None = None, top_k: int | None = None, wait_s: float = 0
    ) -> Call[JobPublic]:
        """A job's view (with `wait_s`, a long poll: the answer comes when it ends or the wait is over)."""
        params = {k: v for k, v in {"top_k": top_k, "wait_s": wait_s or None}.items() if v is not None}
        return Call("GET", _path(job, kind), _view, params=params)

    @operation
    def cancel(self, job: JobPublic | str, kind: str | None = None) -> Call[JobPublic | None]:
        """Cancel a queued or running job (its view), or delete an ended one (None)."""
        return Call("DELETE", _path(job, kind), lambda r: None if r.status_code == 204 else _view(r))

    @operation
    def scores(
        self, job: JobPublic | str, kind: str | None = None, rows: str | None = None, columns: str | None = None
    ) -> Call[np.ndarray]:
        """The score matrix (or a window: rows="a:b", columns="c:d") as a float32 numpy array."""
        params = {k: v for k, v in {"format": "npy", "rows": rows, "columns": columns}.items() if v}
        parse = lambda r: np.load(io.BytesIO(r.content), allow_pickle=False)  # noqa: E731
        return Call("GET", f"{_path(job, kind)}/scores", parse, params=params)

    @operation
    def scores_page(
        self, job: JobPublic | str, kind: str | None = None, rows: str | None = None, columns: str | None = None
    ) -> Call[ScoresPage]:
        """One JSON page of the scores; its `next` is the URL of the following page (or None)."""
        params = {k: v for k, v in {"rows": rows, "columns": columns}.items() if v}
        return Call("GET", f"{_path(job, kind)}/scores", lambda r: ScoresPage.model_validate(r.json()), params=params)

    @operation
    def report(self, job: JobPublic | str, kind: str | None = None) -> Call[str]:
        """The job's self-contained HTML report."""
        return Call("GET", f"{_path(job, kind)}/report", lambda r: r.text)

    @operation
    def export(self, job: JobPublic | str, kind: str | None = None, format: str = "csv") -> Call[str]:
        """The finished job's table (contract/tables.py) as CSV or JSON Lines ("jsonl")."""
        return Call("GET", f"{_path(job, kind)}/export", lambda r: r.text, params={"format": format})

    @operation
    def jobs_page(
        self, kind: str | None = None, status: str | None = None, limit: int = 50, before: str | None = None
    ) -> Call[JobPage]:
        params = {k: v for k, v in {"kind": kind, "status": status, "limit": limit, "before": before}.items() if v}
        return Call("GET", "/v1/jobs", lambda r: JobPage.model_validate(r.json()), params=params)

    @operation
    def models(self) -> Call[list[ModelPublic]]:
        return Call("GET", "/v1/models", lambda r: [ModelPublic.model_validate(m) for m in r.json()])

    @operation
    def model(self, id: str) -> Call[ModelPublic]:
        return Call("GET", f"/v1/models/{id}", lambda r: ModelPublic.model_validate(r.json()))

    @operation
    def datasets(self) -> Call[list[DatasetPublic]]:
        return Call("GET", "/v1/datasets", lambda r: [DatasetPublic.model_validate(d) for d in r.json()])

    # -- indexes (two-stage attribution; building and deleting need an admin key) --------------------------
    @operation
    def create_index(self, model: str, dataset: str, method: dict | None = None, **settings) -> Call[IndexPublic]:
        """Build the index of a model and dataset (IndexSettings' fields: dims, rank): its view, building or
        built. Attributions on them then take `candidates=` (or use it by default for its method)."""
        body = IndexCreate(model=model, dataset=dataset, method=method or {}, settings=settings)
        parse = lambda r: IndexPublic.model_validate(r.json())  # noqa: E731
        return Call("POST", "/v1/indexes", parse, body.model_dump(exclude_none=True))

    @operation
    def index(self, id: str) -> Call[IndexPublic]:
        return Call("GET", f"/v1/indexes/{id}", lambda r: IndexPublic.model_validate(r.json()))

    @operation
    def indexes(self) -> Call[list[IndexPublic]]:
        return Call("GET", "/v1/indexes", lambda r: IndexPage.model_validate(r.json()).items)

    @operation
    def delete_index(self, id: str) -> Call[None]:
        return Call("DELETE", f"/v1/indexes/{id}", lambda r: None)

    # -- registration (an admin key) -----------------------------------------------------------------
    @operation
    def upload(self, kind: str, id: str, path: Path) -> Call[UploadedFile]:
        """Stage one file of a model or dataset being registered (`kind`: "models" | "datasets")."""
        url = f"/v1/admin/{kind}/{id}/files/{path.name}"
        return Call("PUT", url, lambda r: UploadedFile.model_validate(r.json()), content=path.read_bytes())

    @operation
    def register_uploaded_model(self, id: str, **fields) -> Call[ModelRegistered]:
        """Register a model whose files were uploaded (ModelRegistration's fields; dry_run=True only tries it)."""
        body = ModelRegistration(**fields).model_dump(exclude_none=True, mode="json")
        return Call("POST", f"/v1/admin/models/{id}", lambda r: ModelRegistered.model_validate(r.json()), body)

    @operation
    def register_uploaded_dataset(self, id: str, **fields) -> Call[DatasetRegistered]:
        body = DatasetRegistration(**fields).model_dump(exclude_none=True, mode="json")
        parse = lambda r: DatasetRegistered.model_validate(r.json())  # noqa: E731
        return Call("POST", f"/v1/admin/datasets/{id}", parse, body)

    @operation
    def delete_entry(self, kind: str, id: str) -> Call[None]:
        return Call("DELETE", f"/v1/admin/{kind}/{id}", lambda r: None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Operations):
    """The service over HTTP, synchronously. `api_key`: a key from `python -m app.keys create` (none
    needed by a development service without a keys file)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        self.http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, call: Call[T]) -> T:
        response = self.http.request(
            call.method, call.path, json=call.json, content=call.content, params=call.params, headers=call.headers
        )
        return call.parse(_checked(response))

    def wait(self, job: JobPublic | str, kind: str | None = None, progress: Progress | None = None) -> JobPublic:
        """Follow the job until it ends (its Server-Sent Events); `progress(view)` on every update."""
        stream = _EventStream(progress)
        with self.http.stream("GET", f"{_path(job, kind)}/events", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for line in response.iter_lines():
                if (got := stream.feed(line)) is not None and got[0] == "end":
                    return got[1]
        return self.job(job, kind)  # the stream closed early: read the state as it is

    def register_model(self, id: str, folder: Path, **fields) -> ModelRegistered:
        """Upload every file of a model directory (as save_pretrained writes it) and register it."""
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
            self.upload("models", id, path)
        return self.register_uploaded_model(id, **fields)

    def register_dataset(self, id: str, files: list[Path], **fields) -> DatasetRegistered:
        """Upload shard files (or a JSONL corpus: fields text={...}) and register them."""
        for path in files:
            self.upload("datasets", id, Path(path))
        return self.register_uploaded_dataset(id, **fields)

    def jobs(self, kind: str | None = None, status: str | None = None, limit: int = 50) -> Iterator[JobSummary]:
        """This tenant's jobs, newest first, page by page."""
        before = None
        while True:
            page = self.jobs_page(kind, status, limit, before)
            yield from page.items
            if page.next is None:
                return
            before = page.next


class AsyncClient(_Operations):
    """The same operations for asyncio: `await client.attribute(...)`, `await client.wait(job)`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        self.http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _run(self, call: Call[T]) -> T:
        response = await self.http.request(
            call.method, call.path, json=call.json, content=call.content, params=call.params, headers=call.headers
        )
        return call.parse(_checked(response))

    async def wait(self, job: JobPublic | str, kind: str | None = None, progress: Progress | None = None) -> JobPublic:
        """Follow the job until it ends (its Server-Sent Events); `progress(view)` on every update."""
        stream = _EventStream(progress)
        async with self.http.stream("GET", f"{_path(job, kind)}/events", timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                _checked(response)
            async for line in response.aiter_lines():
                if (got := stream.feed(line)) is not None and got[0] == "end":
                    return got[1]
        return await self.job(job, kind)

    async def jobs(
        self, kind: str | None = None, status: str | None = None, limit: int = 50
    ) -> AsyncIterator[JobSummary]:
        before = None
        while True:
            page = await self.jobs_page(kind, status, limit, before)
            for item in page.items:
                yield item
            if page.next is None:
                return
            before = page.next
