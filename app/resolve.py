"""Resolution at the door: a request, checked against the registry and the model's input spec, becomes the
complete typed job payload (contract/jobs.py) that the worker runs exactly. The one place where:

- the method settings are merged (request > preset > the model's defaults > the engine's: contract/method.py)
  and refused when they do not combine, or when the analysis cannot honour them;
- record ids become indices, text becomes tokens, inline data becomes canonical numbers;
- every digest the result depends on, the compute dtype and the engine version enter the identity.

Every problem becomes an InvalidInput (422), NotFound (404) or PayloadTooLarge (413) naming the field and
the reason, so a job never fails on input that could have been refused here.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import NamedTuple

import numpy as np

from contract.indexes import LEAKAGE_CANDIDATES, TRUSTED_RECALL, IndexEntry, default_candidates
from contract.jobs import (
    AttributionJob,
    DatasetRef,
    IndexJob,
    InlinePoints,
    LeakageJob,
    MemorizationJob,
    MislabeledJob,
    ModelRef,
    RecordPoints,
)
from contract.kinds import ANALYSES, Job, needs
from contract.method import MethodConflict, MethodSettings, resolve_method
from contract.problems import InvalidInput, NotFound, PayloadTooLarge
from contract.registry import DatasetManifest, ModelManifest, Registry, RegistryError
from contract.schemas import (
    AttributionCreate,
    ChatCompletion,
    DatasetTest,
    IndexCreate,
    InlineTest,
    JobCreate,
    LeakageCreate,
    MemorizationCreate,
    MislabeledCreate,
    TextTest,
)
from contract.settings import Settings


class Door(NamedTuple):
    """What a kind's `resolve` part checks a request against: the registry, the limits, the request's model
    and training set, and the finished index of the two (if any)."""

    registry: Registry
    settings: Settings
    model: ModelManifest
    dataset: DatasetManifest
    index: IndexEntry | None


def resolve(
    kind: str, request: JobCreate, registry: Registry, settings: Settings, index: IndexEntry | None = None
) -> Job:
    """The request as the payload of a job of `kind`, or the service error that says why it cannot run;
    `index`: the finished index of the request's model and dataset, if there is one (two-stage attribution).
    What every kind shares is checked here; the rest by the kind's `resolve` part (contract/kinds.py)."""
    model, dataset = _pair(request, registry)
    common = _common(kind, request.method, model, dataset, settings)
    door = Door(registry, settings, model, dataset, index)
    part = attribution if kind == "attribution" else ANALYSES[kind].part("resolve")
    return part(request, common, door)


def attribution(request: AttributionCreate, common: dict, door: Door) -> AttributionJob:
    if request.top_k > door.settings.max_top_k:
        raise InvalidInput(f"top_k={request.top_k} exceeds the limit of {door.settings.max_top_k}", _loc("top_k"))
    job = AttributionJob(test=test_points(request.test, door.registry, door.model, door.settings), **common)
    return _two_stage(job, request.candidates, door.index, door.dataset)


def leakage(request: LeakageCreate, common: dict, door: Door) -> LeakageJob:
    deterministic(door.model, "leakage")
    through = _leakage_index(request.candidates, door.index, door.model, door.dataset)
    limit = door.settings.max_index_test_points if through else door.settings.max_test_points
    return LeakageJob(
        test=test_points(request.test, door.registry, door.model, door.settings, limit),
        calibration_records=request.calibration_records,
        false_flag_rate=request.false_flag_rate,
        **common,
        **through,
    )


def mislabeled(request: MislabeledCreate, common: dict, door: Door) -> MislabeledJob:
    model = door.model
    if model.task != "classification":
        raise InvalidInput(f"a mislabeled analysis needs a classification model; {model.id!r} is {model.task}")
    reference = records(request.reference, door.registry, model, door.settings.max_reference_records, "reference")
    return MislabeledJob(reference=reference, rank_by=request.rank_by, review_size=request.review_size, **common)


def memorization(request: MemorizationCreate, common: dict, door: Door) -> MemorizationJob:
    deterministic(door.model, "memorization")
    if request.records.dataset != door.dataset.id:
        raise InvalidInput(
            f"records.dataset must be the training dataset {door.dataset.id!r}", _loc("records", "dataset")
        )
    return MemorizationJob(
        records=records(request.records, door.registry, door.model, door.settings.max_memorization_records, "records"),
        neighbours=request.neighbours,
        calibration_records=request.calibration_records,
        **common,
    )


def deterministic(model: ModelManifest, kind: str) -> None:
    """Refuse a kind that compares records' responses (a copy responds as its original) on a model whose
    per-record loss is random."""
    if model.task == "diffusion":
        raise InvalidInput(
            f"model {model.id!r} is a diffusion model: its per-record loss is an average over random noise draws, "
            f"so a record and its copy do not respond alike; {kind} needs a deterministic loss"
        )


def _pair(request: JobCreate | IndexCreate, registry: Registry) -> tuple[ModelManifest, DatasetManifest]:
    """The request's model and training set, which must take the same examples."""
    model = registry.model(request.model)
    if model is None:
        raise NotFound(f"unknown model {request.model!r}")
    dataset = registry.dataset(request.dataset)
    if dataset is None:
        raise NotFound(f"unknown dataset {request.dataset!r}")
    if dataset.input.shape != model.input.shape or dataset.input.dtype != model.input.dtype:
        raise InvalidInput(
            f"dataset {dataset.id!r} holds {dataset.input.dtype} examples of shape {dataset.input.shape}; "
            f"model {model.id!r} takes {model.input.dtype} of shape {model.input.shape}"
        )
    if not trained_on(model, dataset) and not request.untrained:
        raise InvalidInput(
            f"model {model.id!r} was not trained on {dataset.id!r} (it trained {', '.join(dataset.trained)}): its "
            "scores would not say which records made it predict; set untrained: true if that is intended",
            _loc("untrained"),
        )
    return model, dataset


def trained_on(model: ModelManifest, dataset: DatasetManifest) -> bool:
    """Whether the dataset says the model (or, for an adapter, its base) trained on it; a dataset that names
    no model says nothing against any."""
    return not dataset.trained or bool({model.id, model.base} & set(dataset.trained))


def _common(
    kind: str, asked: MethodSettings, model: ModelManifest, dataset: DatasetManifest, settings: Settings
) -> dict:
    """What every payload carries: the model and dataset by digest, the dtype, the resolved method."""
    try:
        method = resolve_method(asked, model.method, needs(kind))
    except MethodConflict as exc:
        raise InvalidInput(str(exc), [{"loc": ["body", "method", f]} for f in exc.fields]) from None
    names = model.tensor_names()
    for glob in method.params:
        if not any(fnmatch(name, glob) for name in names):
            raise InvalidInput(
                f"method.params: {glob!r} matches no parameter of model {model.id!r} ({', '.join(names[:8])})",
                _loc("method", "params"),
            )
    return {
        "model": ModelRef(id=model.id, digest=model.digest),
        "dataset": DatasetRef(id=dataset.id, digest=dataset.digest),
        "dtype": settings.dtype,
        "method": method,
        "untrained": not trained_on(model, dataset),
    }


def _two_stage(job: AttributionJob, candidates: int | None, index: IndexEntry | None, dataset) -> AttributionJob:
    """Two-stage where the request asks for candidates, or says nothing and an index was built for its
    method (and dtype) whose recall, measured at build, is at least TRUSTED_RECALL (a sketch that ranks a
    method's scores poorly, such as a finite Adam step's, is used only when asked for); the full sweep
    where it asks for 0, or where the candidates would cover the set (a sweep of every record is then as
    cheap, and complete)."""
    usable = (
        index is not None
        and (index.method, index.dtype) == (job.method, job.dtype)
        and (index.recall or 0.0) >= TRUSTED_RECALL
    )
    if candidates is None:
        candidates = default_candidates(dataset.size) if usable else 0
    if candidates and index is None:
        raise InvalidInput(
            f"candidates={candidates}: there is no index of model {job.model.id!r} on {dataset.id!r} in its current "
            "version (POST /v1/indexes builds one); leave candidates out, or 0, for the full sweep",
            _loc("candidates"),
        )
    if not candidates or 2 * candidates >= dataset.size:
        return job
    return job.model_copy(update={"index": index.id, "candidates": candidates})


def _leakage_index(candidates: int | None, index: IndexEntry | None, model: ModelManifest, dataset) -> dict:
    """A leakage analysis goes through the index (its fields) where the request asks for candidates, or says
    nothing and there is an index; only where the model's inputs are float vectors or text (the index keeps
    their embedding; token ids alone have none)."""
    embeds = model.input.dtype == "float32" or model.input.text is not None
    if candidates is None:
        candidates = LEAKAGE_CANDIDATES if index is not None and embeds else 0
    if not candidates:
        return {}
    if index is None or not embeds:
        why = "its inputs are token ids without text, which the index does not embed" if index else "there is no index"
        raise InvalidInput(
            f"candidates={candidates}: {why} of model {model.id!r} on {dataset.id!r}; leave candidates out, or 0, "
            "for the full analysis",
            _loc("candidates"),
        )
    return {"index": index.id, "candidates": candidates}


def resolve_index(request: IndexCreate, registry: Registry, settings: Settings, built: list[IndexEntry]) -> IndexJob:
    """An index build's payload for the request's attribution method. A new version of a dataset that
    was indexed before with the same model, method and settings, and keeps that version's shards, adopts its
    basis (`basis_of`): only the shards it adds are sketched."""
    model, dataset = _pair(request, registry)
    job = IndexJob(settings=request.settings, **_common("attribution", request.method, model, dataset, settings))
    shards = {s.sha256 for s in dataset.shards}
    for e in sorted(built, key=lambda e: e.created, reverse=True):
        same = (e.model, e.method, e.settings, e.dtype) == (job.model, job.method, job.settings, job.dtype)
        if same and e.dataset.id == dataset.id and {s.sha256 for s in e.shards} <= shards:
            return job if e.dataset == job.dataset else job.model_copy(update={"basis_of": e.basis_of})
    return job


def test_points(
    test: InlineTest | DatasetTest | TextTest,
    registry: Registry,
    model: ModelManifest,
    settings: Settings,
    limit: int | None = None,
) -> InlinePoints | RecordPoints:
    """The test points, at most `limit` (default ATTR_MAX_TEST_POINTS)."""
    limit = limit or settings.max_test_points
    if isinstance(test, DatasetTest):
        return records(test, registry, model, limit)
    if isinstance(test, TextTest):
        test = encode_text(test, model)  # from here on, token ids like any inline test
    return inline(test, model, settings, limit)


def encode_text(test: TextTest, model: ModelManifest) -> InlineTest:
    """Prompt + completion -> token ids (UTF-8 bytes, or the model's own tokenizer, without special
    tokens) padded with the model's pad id, and a mask marking the completion's tokens. Truncation: a
    prompt too long for `max_length` loses its beginning; a completion that does not fit is refused."""
    if model.task != "causal-lm" or model.input.text is None:
        raise InvalidInput(f"model {model.id!r} does not take text", _loc("test", "texts"))
    tokens = []
    for n, t in enumerate(test.texts):
        try:
            prompt = model.chat([m.model_dump() for m in t.messages]) if isinstance(t, ChatCompletion) else t.prompt
        except RegistryError as exc:
            raise InvalidInput(f"test.texts[{n}].messages: {exc}", _loc("test", "texts", n, "messages")) from None
        tokens.append((model.encode(prompt), model.encode(t.completion)))
    limit, pad = model.input.max_length, model.input.pad_id
    for n, (prompt, completion) in enumerate(tokens):
        if limit is not None and len(completion) > limit - 1:
            raise InvalidInput(
                f"test.texts[{n}].completion: {len(completion)} tokens do not fit the model's {limit} (one is kept "
                "for context)",
                _loc("test", "texts", n, "completion"),
            )
        if not completion:
            raise InvalidInput(f"test.texts[{n}].completion: no tokens", _loc("test", "texts", n, "completion"))
        if limit is not None and len(prompt) + len(completion) > limit:
            tokens[n] = (prompt[len(prompt) + len(completion) - limit :], completion)
    width = max(len(p) + len(c) for p, c in tokens)
    return InlineTest(
        inputs=[p + c + [pad] * (width - len(p) - len(c)) for p, c in tokens],
        targets=[[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in tokens],
    )


def _loc(*loc, msg: str = "") -> list[dict]:
    return [{"loc": ["body", *loc], "msg": msg}] if msg else [{"loc": ["body", *loc]}]


def inline(test: InlineTest, model: ModelManifest, settings: Settings, limit: int | None = None) -> InlinePoints:
    """Inline test points checked against the model's input spec, as canonical numbers (token ids as
    integers, features as floats), so equal data always has the same identity."""
    spec, n, limit = model.input, len(test.inputs), limit or settings.max_test_points
    if n > limit:
        raise PayloadTooLarge(f"{n} test points exceed the limit of {limit} per request")
    try:
        x = np.asarray(test.inputs, dtype=np.float64)
    except (ValueError, TypeError):
        raise InvalidInput(
            "test.inputs: must be a regular numeric array (one array per test point)", _loc("test", "inputs")
        ) from None
    shape = list(x.shape[1:])
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=False)
    ):
        raise InvalidInput(
            f"test.inputs: each test point must have shape {spec.shape} for model {model.id!r}, got {shape}",
            _loc("test", "inputs"),
        )
    if not np.isfinite(x).all():
        raise InvalidInput("test.inputs: contains NaN or infinity", _loc("test", "inputs"))
    if spec.dtype == "int64" and not (x == np.round(x)).all():
        raise InvalidInput("test.inputs: must be integers (token ids) for this model", _loc("test", "inputs"))
    if spec.range is not None and ((x < spec.range[0]).any() or (x > spec.range[1]).any()):
        raise InvalidInput(
            f"test.inputs: values must lie in [{spec.range[0]}, {spec.range[1]}], got [{x.min():g}, {x.max():g}]",
            _loc("test", "inputs"),
        )
    if spec.max_length is not None and x.shape[1] > spec.max_length:
        raise InvalidInput(
            f"test.inputs: {x.shape[1]} tokens exceed the model's maximum of {spec.max_length}", _loc("test", "inputs")
        )
    if spec.vocab_size is not None and ((x < 0).any() or (x >= spec.vocab_size).any()):
        raise InvalidInput(f"test.inputs: token ids must lie in 0..{spec.vocab_size - 1}", _loc("test", "inputs"))
    if model.task == "causal-lm" and x.shape[1] < 2:
        raise InvalidInput("test.inputs: a causal LM needs at least 2 tokens per test point", _loc("test", "inputs"))
    y = _targets(test.targets, n, model, x.shape[1:])
    inputs = x.astype(np.int64) if spec.dtype == "int64" else x
    return InlinePoints(inputs=inputs.tolist(), targets=None if y is None else y.tolist())


def _targets(targets, n: int, model: ModelManifest, input_shape) -> np.ndarray | None:
    loc = _loc("test", "targets")
    if model.task == "diffusion":
        if targets is not None:
            raise InvalidInput("test.targets: a diffusion model takes images only", loc)
        return None
    if targets is None:
        if model.task in ("classification", "regression"):
            raise InvalidInput(f"test.targets: required for a {model.task} model (one per test point)", loc)
        return None
    if len(targets) != n:
        raise InvalidInput(f"test.targets: {len(targets)} targets for {n} test points", loc)
    try:
        y = np.asarray(targets, dtype=np.float64)
    except (ValueError, TypeError):
        raise InvalidInput("test.targets: must be a regular numeric array", loc) from None
    if not np.isfinite(y).all():
        raise InvalidInput("test.targets: contains NaN or infinity", loc)
    if model.task == "classification":
        classes = model.input.num_classes
        if y.ndim != 1 or not (y == np.round(y)).all():
            raise InvalidInput("test.targets: class labels must be integers, one per test point", loc)
        if classes is not None and ((y < 0).any() or (y >= classes).any()):
            raise InvalidInput(f"test.targets: labels must lie in 0..{classes - 1}", loc)
    elif model.task == "causal-lm" and y.shape != (n, *input_shape):
        raise InvalidInput("test.targets: a causal-LM target mask must match the token arrays' shape", loc)
    elif model.task == "causal-lm" and not (y[:, 1:] != 0).any(1).all():
        raise InvalidInput("test.targets: each mask needs a target token after the first", loc)
    return y if model.task == "regression" else y.astype(np.int64)


def records(
    test: DatasetTest, registry: Registry, model: ModelManifest, limit: int, field: str = "test"
) -> RecordPoints:
    """Records of a registered dataset, by index: record ids are mapped to indices here, once."""
    dataset: DatasetManifest | None = registry.dataset(test.dataset)
    if dataset is None:
        raise NotFound(f"unknown dataset {test.dataset!r} ({field}.dataset)")
    if (test.records is None) == (test.indices is None):
        raise InvalidInput(f"{field}: give exactly one of 'records' or 'indices'", _loc(field))
    picks = test.records if test.records is not None else test.indices
    if not picks:
        raise InvalidInput(f"{field}: nothing selected", _loc(field))
    if len(picks) > limit:
        raise PayloadTooLarge(f"{field}: {len(picks)} records exceed the limit of {limit} per request")
    if dataset.input.shape != model.input.shape:
        raise InvalidInput(
            f"{field}.dataset {dataset.id!r} holds examples of shape {dataset.input.shape}; "
            f"model {model.id!r} takes {model.input.shape}",
            _loc(field, "dataset"),
        )
    if test.indices is not None:
        indices = list(test.indices)
        bad = [i for i in indices if i >= dataset.size]
        if bad:
            raise InvalidInput(
                f"{field}.indices: {bad[:5]} out of range for {dataset.id!r} ({dataset.size} records)",
                _loc(field, "indices"),
            )
    else:
        positions = dataset.positions()
        missing = [r for r in test.records if r not in positions]
        if missing:
            raise NotFound(f"{field}.records: unknown record ids in {dataset.id!r}: {missing[:5]}")
        indices = [positions[r] for r in test.records]
    return RecordPoints(dataset=DatasetRef(id=dataset.id, digest=dataset.digest), indices=indices)
