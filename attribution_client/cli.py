"""`attribution` (or `python -m attribution_client`): the service from a terminal or a script.

    attribution attribute digits-mlp digits-train --test-dataset digits-test --indices 0,1 --top-k 5
    attribution attribute digits-mlp digits-train --inputs points.npy --targets labels.npy
    attribution leakage | mislabeled | memorization ...
    attribution analyze KIND MODEL DATASET --fields '{...}'   (any kind known here, ATTR_ANALYSES's too)
    attribution jobs list | show ID | cancel ID
    attribution models list | show ID        attribution datasets list
    attribution report ID --open

The service and key come from --url / --key or ATTR_URL / ATTR_API_KEY. Submitting commands follow the
job to its end with a progress bar (or `--no-wait`), then print its answer as a table; `--json` prints the
job's view as JSON (for scripts), `--out table.csv` (or .jsonl) writes the table as the API exports it. A
job id may be given as any unique start of it.

Exit codes: 0 the job finished (or the command did what it says); 1 the job failed; 2 usage errors
(typer's); 3 the job was canceled; 4 the service refused the request (4xx problem: its detail is shown);
5 the service is unavailable (5xx, or not reachable).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
import webbrowser
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, get_args

import httpx
import numpy as np
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from contract import kinds, tables
from contract.jobs import HANDLE_LENGTH
from contract.method import Family
from contract.problems import NotFound, ServiceError
from contract.schemas import ENDED

from .client import Client

EXIT = {"finished": 0, "failed": 1, "canceled": 3}
REFUSED, UNAVAILABLE = 4, 5
app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
jobs_app = typer.Typer(help="this tenant's jobs", no_args_is_help=True)
models_app = typer.Typer(help="registered models", no_args_is_help=True)
datasets_app = typer.Typer(help="registered datasets", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
out, err = Console(), Console(stderr=True)

Url = Annotated[str, typer.Option(envvar="ATTR_URL", help="the service's base URL")]
Key = Annotated[str | None, typer.Option(envvar="ATTR_API_KEY", help="an API key (python -m app.keys create)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
Wait = Annotated[bool, typer.Option("--wait/--no-wait", help="follow the job to its end")]
Method = Annotated[str | None, typer.Option(help='method settings as JSON, e.g. \'{"preset": "leakage"}\'')]
TestDataset = Annotated[str | None, typer.Option(help="test points: records of this dataset")]
Indices = Annotated[str | None, typer.Option(help="records by index, e.g. 0,1,2")]
Records = Annotated[str | None, typer.Option(help="or by record id, comma-separated")]
Inputs = Annotated[Path | None, typer.Option(help="or inline inputs: .npy, .json, .jsonl or an image")]
Targets = Annotated[Path | None, typer.Option(help="their targets (.npy, .json, .jsonl)")]
OutFile = Annotated[
    Path | None, typer.Option("--out", help="also write the result's table: a .csv or .jsonl file (as the API exports)")
]
Kind = Annotated[str | None, typer.Option(help="attribution or analysis (default: found by the id)")]
DEFAULT_URL = "http://127.0.0.1:8000"


@app.callback()
def connection(ctx: typer.Context, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """The service and the key every command uses."""
    ctx.obj = {"base_url": url, "api_key": key}


@contextlib.contextmanager
def _service(ctx: typer.Context) -> Iterator[Client]:
    """A client; a problem answer or an unreachable service ends the command with its exit code."""
    try:
        with Client(**ctx.obj) as client:
            yield client
    except ServiceError as exc:
        err.print(f"[red]{exc.status} {exc.title}[/red]: {exc.detail}")
        raise typer.Exit(REFUSED if exc.status < 500 else UNAVAILABLE) from None
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach the service[/red]: {exc}")
        raise typer.Exit(UNAVAILABLE) from None


def _find(client: Client, job_id: str, kind: str | None) -> tuple[str, str]:
    """The job's full id and kind: `job_id` is its id (asked for directly) or a unique start of the id of one
    of this tenant's jobs (found in their list, which is read until a second match), of `kind` where given
    (attribution, analysis or an analysis' name)."""
    if len(job_id) == HANDLE_LENGTH:
        for family in (kind,) if kind else get_args(Family):
            with contextlib.suppress(NotFound):
                return job_id, getattr(client.job(job_id, family), "kind", "attribution")
    wanted = {"analysis": tuple(kinds.ANALYSES)}.get(kind or "", (kind,) if kind else None)
    matches = (
        (j.id, j.kind) for j in client.jobs(limit=200) if j.id.startswith(job_id) and (not wanted or j.kind in wanted)
    )
    found = dict(itertools.islice(matches, 2))
    if len(found) > 1:
        raise typer.BadParameter(f"{job_id!r} is the start of more than one job id: {', '.join(sorted(found))}, ...")
    if not found:
        what = {"attribution": "attribution", None: "attribution or analysis"}.get(kind, f"{kind} analysis")
        err.print(f"[red]404 Not Found[/red]: no {what} of this tenant has an id starting {job_id!r}")
        raise typer.Exit(REFUSED)
    return next(iter(found.items()))


def _points(dataset: str | None, indices: str | None, records: str | None, inputs: Path | None, targets: Path | None,
            texts: Path | None) -> dict:  # fmt: skip
    """Test points from the options: records of a dataset, arrays from .npy/.json/.jsonl files, or text."""
    if dataset:
        if indices:
            return {"dataset": dataset, "indices": _indices(indices)}
        if records:
            return {"dataset": dataset, "records": records.split(",")}
        raise typer.BadParameter(f"records of {dataset!r}: give --indices or --records")
    if texts:  # JSONL of {"prompt": ..., "completion": ...}
        return {"texts": [json.loads(line) for line in texts.read_text().splitlines() if line.strip()]}
    if inputs:
        point = {"inputs": _array(inputs)}
        if targets:
            point["targets"] = _array(targets)
        return point
    raise typer.BadParameter("give --test-dataset (with --indices or --records), --inputs, or --texts")


def _indices(text: str) -> list[int]:
    """0,1,2 or ranges, 0-5 (both ends included)."""
    try:
        return [i for part in text.split(",") for i in _span(*map(int, part.split("-")))]
    except (TypeError, ValueError):
        raise typer.BadParameter(f"--indices {text!r}: whole numbers and ranges, e.g. 0,1,2 or 0-5") from None


def _span(first: int, last: int | None = None) -> range:
    return range(first, (first if last is None else last) + 1)


def _object(text: str | None, option: str = "--method", example: str = '{"precondition": "ekfac"}') -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{option} {text!r}: a JSON object, e.g. '{example}'")
    return value


def _array(path: Path) -> list:
    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such file")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).tolist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix in (".png", ".jpg", ".jpeg"):  # one grayscale image in [0, 1]; Pillow if installed
        from PIL import Image

        return [(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255).tolist()]
    return json.loads(path.read_text())


def _follow(client: Client, view, wait: bool, as_json: bool, out_file: Path | None = None):
    """Follow the job (a progress bar on stderr), print it (and write its table to `out_file`), exit with
    its status's code."""
    if wait and view.status not in ENDED:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:  # fmt: skip
            task = bar.add_task(view.id[:12], total=None)

            def show(v):
                bar.update(
                    task, completed=v.progress.done, total=v.progress.total, description=f"{v.id[:12]} {v.status}"
                )

            view = client.wait(view, progress=show)
    if as_json:
        out.print_json(view.model_dump_json())
    else:
        _show(view)
    _write(client, view, out_file)
    raise typer.Exit(EXIT.get(view.status, 0))


def _table_format(path: Path | None) -> str | None:
    if path is not None and path.suffix.lstrip(".") not in tables.FORMATS:
        raise typer.BadParameter(f"--out {path}: name a .csv or .jsonl file")
    return path and path.suffix.lstrip(".")


def _write(client: Client, view, path: Path | None) -> None:
    """The finished job's table as the API exports it (contract/tables.py), to `path` (.csv or .jsonl)."""
    if path is not None and view.status == "finished":
        path.write_text(client.export(view.id, getattr(view, "kind", "attribution"), _table_format(path)))
        err.print(f"wrote {path}")


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "" if value is None else str(value)


def _show(view) -> None:
    kind = getattr(view, "kind", "attribution")
    out.print(f"[bold]{view.id}[/bold] {kind} {view.status}  model {view.model}, training set {view.dataset}")
    if view.error:
        out.print(f"[red]{view.error}[/red]")
    if view.status in ("queued", "running"):
        p = view.progress
        done = f"{p.done:,}/{p.total:,} {p.unit} ({p.done / p.total:.0%})" if p.total else f"{p.done:,} {p.unit}"
        eta = f", about {p.eta_s:,.0f} s left" if p.eta_s is not None else ""
        out.print(f"{view.status}: {done}{eta}")
    result = view.result
    if result is None:
        return
    if kind == "attribution":
        for row in result.rows:
            t = row.test
            said = (
                f", label {t.label}, predicted {t.predicted} (p {t.p_predicted:.2f})" if t.predicted is not None else ""
            )
            table = Table(
                title=f"test point {row.row}: {tables.test_name(t.model_dump())} (loss {row.test_loss:.3g}{said})"
            )
            for name in ("proponent", "score", "opponent", "score "):
                table.add_column(name)
            for p, o in zip(row.proponents, row.opponents, strict=False):
                table.add_row(p.record_id, f"{p.score:.3g}", o.record_id, f"{o.score:.3g}")
            out.print(table)
        return
    out.print(result.summary)
    answer = kinds.table(kind)
    table = Table(*answer.columns)
    for row in answer.rows(result.model_dump(mode="json")):
        table.add_row(*map(_number, row.values()))
    out.print(table)


def _submit(ctx: typer.Context, wait: bool, as_json: bool, out_file: Path | None, operation: str, *args, **kwargs):
    _table_format(out_file)
    with _service(ctx) as client:
        try:
            view = getattr(client, operation)(*args, **kwargs)
        except ValidationError as exc:  # the request, checked here before it is sent
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise typer.BadParameter(problems) from None
        _follow(client, view, wait, as_json, out_file)


@app.command()
def attribute(
    ctx: typer.Context,
    model: str,
    dataset: str,
    test_dataset: TestDataset = None,
    indices: Indices = None,
    records: Records = None,
    inputs: Inputs = None,
    targets: Targets = None,
    texts: Annotated[Path | None, typer.Option(help="or text: JSONL of {prompt, completion}")] = None,
    top_k: int = 10,
    method: Method = None,
    wait: Wait = True,
    as_json: AsJson = False,
    out_file: OutFile = None,
):
    """Which training records made the model predict this? Top proponents and opponents per test point."""
    test = _points(test_dataset, indices, records, inputs, targets, texts)
    _submit(ctx, wait, as_json, out_file, "attribute", model, dataset, test, top_k, _object(method))


@app.command()
def leakage(
    ctx: typer.Context,
    model: str,
    dataset: str,
    test_dataset: TestDataset = None,
    indices: Indices = None,
    records: Records = None,
    inputs: Inputs = None,
    targets: Targets = None,
    method: Method = None,
    wait: Wait = True,
    as_json: AsJson = False,
    out_file: OutFile = None,
):
    """Which test points are in the training set (calibrated; the closest records as evidence)?"""
    test = _points(test_dataset, indices, records, inputs, targets, None)
    _submit(ctx, wait, as_json, out_file, "leakage", model, dataset, test, _object(method))


@app.command()
def mislabeled(
    ctx: typer.Context,
    model: str,
    dataset: str,
    reference_dataset: Annotated[str, typer.Option(help="clean, vetted records")],
    indices: Indices = None,
    records: Records = None,
    method: Method = None,
    wait: Wait = True,
    as_json: AsJson = False,
    out_file: OutFile = None,
):
    """Which training labels are likely wrong (a review list with its expected precision)?"""
    reference = _points(reference_dataset, indices, records, None, None, None)
    _submit(ctx, wait, as_json, out_file, "mislabeled", model, dataset, reference, _object(method))


@app.command()
def memorization(
    ctx: typer.Context,
    model: str,
    dataset: str,
    indices: Indices = None,
    records: Records = None,
    method: Method = None,
    wait: Wait = True,
    as_json: AsJson = False,
    out_file: OutFile = None,
):
    """How much does the model rely on these training records themselves (and their copies)?"""
    audited = _points(dataset, indices, records, None, None, None)
    _submit(ctx, wait, as_json, out_file, "memorization", model, dataset, audited, _object(method))


@app.command()
def analyze(
    ctx: typer.Context,
    kind: str,
    model: str,
    dataset: str,
    fields: Annotated[str, typer.Option(help="the request's other fields as a JSON object")] = "{}",
    method: Method = None,
    wait: Wait = True,
    as_json: AsJson = False,
    out_file: OutFile = None,
):
    """Any analysis kind this client knows, an operator's own (ATTR_ANALYSES) too; the request's fields as JSON."""
    if kind not in kinds.ANALYSES:
        known = ", ".join(kinds.ANALYSES)
        raise typer.BadParameter(f"unknown analysis kind {kind!r}; known here: {known} (ATTR_ANALYSES adds more)")
    body = _object(fields, "--fields", '{"test": {"dataset": "digits-test", "indices": [0]}}')
    _submit(ctx, wait, as_json, out_file, "analyze", kind, model, dataset, _object(method), **body)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    kind: str | None = None, status: str | None = None, limit: int = 20,
    as_json: AsJson = False,
):  # fmt: skip
    """This tenant's jobs, newest first."""
    with _service(ctx) as client:
        items = [j for _, j in zip(range(limit), client.jobs(kind, status, min(limit, 200)), strict=False)]
    if as_json:
        out.print_json(json.dumps([j.model_dump(mode="json") for j in items]))
        return
    table = Table("kind", "status", "model", "dataset", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=32))  # whole: it is what the other commands take
    for j in items:
        table.add_row(j.id, j.kind, j.status, j.model, j.dataset, j.created.isoformat(timespec="seconds"))
    out.print(table)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str, kind: Kind = None, as_json: AsJson = False, out_file: OutFile = None):
    """One job (its id or a unique start of it): status, progress and ETA, and once finished its result."""
    _table_format(out_file)
    with _service(ctx) as client:
        view = client.job(*_find(client, job_id, kind))
        out.print_json(view.model_dump_json()) if as_json else _show(view)
        _write(client, view, out_file)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str, kind: Kind = None):
    """Cancel a queued or running job; delete an ended one."""
    with _service(ctx) as client:
        job_id, family = _find(client, job_id, kind)
        view = client.cancel(job_id, family)
    out.print(f"{job_id} {'deleted' if view is None else view.status}")


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: AsJson = False):
    with _service(ctx) as client:
        models = client.models()
    if as_json:
        out.print_json(json.dumps([m.model_dump(mode="json") for m in models]))
        return
    table = Table("id", "task", "architecture", "description")
    for m in models:
        table.add_row(m.id, m.task, m.architecture, m.description)
    out.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, model_id: str):
    with _service(ctx) as client:
        out.print_json(client.model(model_id).model_dump_json())


@models_app.command("register")
def models_register(
    ctx: typer.Context,
    model_id: str,
    folder: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="the model directory (save_pretrained's)")
    ],
    architecture: Annotated[
        str, typer.Option(help="transformers:causal-lm, peft:lora, diffusers:unet2d, builtin:NAME, ...")
    ],
    base: Annotated[str | None, typer.Option(help="peft:lora: the registered base model")] = None,
    fields: Annotated[str | None, typer.Option("--fields", help="more ModelRegistration fields as JSON")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="load and step it on a worker, do not register")] = False,
):
    """Upload a model directory and register it (an admin key); a worker loads and steps it first."""
    extra = json.loads(fields) if fields else {}
    with _service(ctx) as client:
        done = client.register_model(model_id, folder, architecture=architecture, base=base, dry_run=dry_run, **extra)
    out.print_json(done.model_dump_json())


@models_app.command("delete")
def models_delete(ctx: typer.Context, model_id: str):
    """Unregister a model (an admin key)."""
    with _service(ctx) as client:
        client.delete_entry("models", model_id)
    out.print(f"{model_id} deleted")


@datasets_app.command("register")
def datasets_register(
    ctx: typer.Context,
    dataset_id: str,
    files: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, help="shards (.safetensors/.npy), or one .jsonl")
    ],
    input_spec: Annotated[str | None, typer.Option("--input", help="the input spec as JSON (shards)")] = None,
    text_model: Annotated[
        str | None, typer.Option(help="a .jsonl corpus: the model whose tokenizer encodes it")
    ] = None,
    max_length: Annotated[int, typer.Option(help="a .jsonl corpus: tokens per record")] = 128,
    trained: Annotated[list[str] | None, typer.Option(help="models trained on it")] = None,
):
    """Upload a dataset's files and register it (an admin key)."""
    fields: dict = {"trained": trained or []}
    if text_model:
        fields["text"] = {"file": files[0].name, "model": text_model, "max_length": max_length}
    else:
        fields |= {
            "shards": [f.name for f in files if not f.name.endswith(".targets.npy") and f.name != "records.json"]
        }
        fields["input"] = json.loads(input_spec) if input_spec else None
    with _service(ctx) as client:
        done = client.register_dataset(dataset_id, files, **fields)
    out.print_json(done.model_dump_json())


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, as_json: AsJson = False):
    with _service(ctx) as client:
        datasets = client.datasets()
    if as_json:
        out.print_json(json.dumps([d.model_dump(mode="json") for d in datasets]))
        return
    table = Table("id", "records", "shards", "trained", "description")
    for d in datasets:
        table.add_row(d.id, f"{d.size:,}", str(d.shards), ", ".join(d.trained), d.description)
    out.print(table)


@app.command()
def report(
    ctx: typer.Context,
    job_id: str,
    kind: Kind = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the HTML here")] = None,
    open_: Annotated[bool, typer.Option("--open", help="open it in a browser")] = False,
):
    """A finished job's HTML report (self-contained: no network needed to view it)."""
    with _service(ctx) as client:
        job_id, family = _find(client, job_id, kind)
        page = client.report(job_id, family)
    path = output or Path(tempfile.gettempdir()) / f"attribution-report-{job_id}.html"
    path.write_text(page)
    out.print(str(path))
    if open_:
        webbrowser.open(path.resolve().as_uri())


def main() -> None:  # the console script
    app(prog_name="attribution")
