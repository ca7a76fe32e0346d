"""The contract both processes share (contract/): its import direction, the method settings against the
engine's config, the precedence order, the analyses' rules, the request identity and verified reads."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import subprocess
import typing
from pathlib import Path

import numpy as np
import pytest

from contract.jobs import ENGINE_VERSION, AttributionJob, DatasetRef, InlinePoints, ModelRef, RecordPoints
from contract.kinds import ANALYSES, needs, register
from contract.method import PRESETS, Method, MethodConflict, MethodDefaults, MethodSettings, family_of, resolve_method
from tests.conftest import PYTHON, ROOT

# -- import direction: app -> contract <- worker; the engine imports none of them -------------------------
FORBIDDEN = {
    "contract": {"app", "worker", "torch", "redis", "rq", "fastapi", "starlette", "uvicorn"},
    "app": {"worker", "torch"},
    "worker": {"app", "fastapi", "starlette", "uvicorn"},
    "worker/forward_inf": {"app", "contract", "worker", "redis", "rq", "fastapi", "starlette"},
}


def imports(path: Path) -> set[str]:
    """Top-level package names a module imports (relative imports resolved against its own package)."""
    package = path.relative_to(ROOT).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join([*base, node.module or ""]).strip("."))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_direction(folder):
    engine = ROOT / "worker" / "forward_inf"
    for path in sorted((ROOT / folder).rglob("*.py")):
        if folder == "worker" and engine in path.parents:
            continue  # the engine has stricter rules of its own
        for name in imports(path):
            if folder == "worker/forward_inf" and name.startswith("worker.forward_inf"):
                continue
            top = name.split(".")[0]
            assert top not in FORBIDDEN[folder], f"{path.relative_to(ROOT)} imports {name}"


def test_the_contract_loads_none_of_the_heavy_packages():
    code = (
        "import sys, contract.jobs, contract.method, contract.registry, contract.schemas, contract.settings\n"
        "loaded = {'torch', 'redis', 'rq', 'fastapi', 'app', 'worker'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded"
    )
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, check=True)


# -- the service's method settings and the engine's MirrorConfig cannot drift -----------------------------
def test_method_and_the_engine_config_cannot_drift():
    from worker.forward_inf import PRESETS as ENGINE_PRESETS
    from worker.forward_inf import MirrorConfig

    engine_fields = {f.name: f for f in dataclasses.fields(MirrorConfig)}
    hints = typing.get_type_hints(MirrorConfig)
    engine_default, ours = MirrorConfig(), Method()
    for name, info in Method.model_fields.items():
        assert name in engine_fields, f"Method.{name} is not an engine setting"
        assert getattr(ours, name) == getattr(engine_default, name), f"default of {name}"
        if typing.get_origin(info.annotation) is typing.Literal:
            assert typing.get_args(info.annotation) == typing.get_args(hints[name]), f"choices of {name}"
    for name, preset in PRESETS.items():
        assert preset == ENGINE_PRESETS[name], f"preset {name!r}"
        assert set(preset) <= set(Method.model_fields)


CHOICES = {
    name: typing.get_args(info.annotation)
    for name, info in Method.model_fields.items()
    if typing.get_origin(info.annotation) is typing.Literal
} | {"group": (False, True), "damping": (0.0, 1e-2)}


def test_the_contract_refuses_exactly_what_the_engine_refuses():
    """Every combination of the categorical settings (and of damping zero or not): refused at the door
    iff the engine refuses it."""
    from worker.forward_inf import AttributionInputError, MirrorConfig

    names = sorted(CHOICES)
    for values in itertools.product(*(CHOICES[n] for n in names)):
        settings = dict(zip(names, values, strict=True))
        try:
            MirrorConfig(**settings)
            engine_ok = True
        except AttributionInputError:
            engine_ok = False
        try:
            Method(**settings)
            ours_ok = True
        except ValueError:
            ours_ok = False
        assert ours_ok == engine_ok, settings


# The engine's code (worker/forward_inf, worker/analyses; comments and docstrings aside) as each engine
# version accepts it. A change to the engine must either come with a new contract.jobs.ENGINE_VERSION (it
# changes scores, base losses, curvature or an analysis' answer: nothing made by older code is served) or
# add its fingerprint to the current version's set, which says, for the reviewer to check, that it does not.
ENGINE_FINGERPRINTS = {
    "2026.12.1": {
        "1715ac480ffb0599",
        "f1ac73ab37bf261e",  # refuses precondition with damping <= 0 (it failed later, or gave inf)
    },
    # streamed shards (sized re-iterables); a curvature can be restored from its saved factor; the worker
    # estimates curvature on a spread sample read alone
    # (the same records, other batches: results differ in the last bits)
    "2026.12.2": {"c5af7816a915fce3"},
    "2026.12.3": {
        "e99dfe49a6acd04a",  # results echo their test points (a new result format)
        "bef320420aebb128",  # adds precondition kfac/ekfac: what the other settings compute is unchanged
        "3cf9abb8e5ec6074",  # the mirror says when it normalised memorised rows (same scores)
    },
    # model families (transformers, peft, diffusers); auto takes EK-FAC where no Hessian is affordable and
    # the last layer is not linear (a tied LM head), instead of a LayerNorm's Hessian or none
    "2026.12.4": {"1c2d33dceaa87f07"},
    "2026.12.5": {"94f1b10847a6820c"},
    "2026.12.6": {"ba1acac8beac07de", "89042bdf6e467281"},
    # mislabeled: p_wrong (the loss at a temperature fitted on the reference, updated by harm) ranks, sizes
    # and prices the review list
    "2026.12.7": {"8fa26fb4378757e3"},
    "2026.12.8": {
        "c1b42c65b51d85f8",  # the temperature's fit has a prior on log T (few reference points)
        "0daaf0d2af41e32f",  # the temperature is fitted once per part, not per shard (same results)
        "c4c1163739b113e8",  # the Hessian's products are vmapped in a measured chunk (same rows, bitwise)
    },
    # mislabeled: the calibration adds per-class offsets to the temperature (bias-corrected temperature scaling),
    # a label-noise rate where the model did not memorise its labels, a refusal where it explains the reference
    # no better than class frequencies; the curvature's sample spans the set
    "2026.12.9": {"725e993a110b2e34"},
    # attribution: precondition "auto" takes the Hessian's top eigenpairs ("lowrank"), priced by its largest basis;
    # a perturbed last layer is swept alone on its cached inputs; then, with the same results, the base losses on
    # the Tail, and the curvature sample on the Tail inputs prepare() holds
    "2026.12.10": {"c86c462d2a688430", "e638029bf4ef1f13", "8b62ba920c28ae40"},
    # "lowrank": a Nystrom estimate on the sketch's range (two products per basis vector, not three), its core
    # truncated to 3/4, Rayleigh-Ritz where it would pass |QH|; a basis covering the whole matrix is the exact
    # Hessian; damping "auto" at an L2 optimum damps undecayed parameters (biases) at the floor only; then, with
    # the same results, that exact Hessian built directly instead of decomposed and rebuilt
    "2026.12.11": {"3c2322b85885651e", "6cd0b31571b9c3ab"},
    # mislabeled: where the model did not memorise and class-dependent noise explains its labels (2.71 per
    # rate), the prior takes out the lean the reference set shows (Calibration.confusion; parts store class
    # probabilities)
    "2026.12.12": {"339786d236bd8feb"},
    # precondition="auto" with damping "auto": where the low-rank Hessian it chose shows an eigenvalue below
    # -damping, EK-FAC instead
    "2026.12.13": {
        "8f290b087182fe16",
        # adds the index's gradient sketch (ForwardInf.basis, .sketch) and, for leakage through it, each row's
        # scores of its own candidates (ForwardInf.paired, .losses) and the analysis split into reusable steps:
        # what the existing settings and analyses compute is unchanged
        "dbfb5d9d06e87a4e",
        # the sketch takes up to 262,144 parameters; Similarity.of_spread (an index's sample) and `scaled` public;
        # an unused property dropped
        "9af2561eb1089245",
    },
    # results say what a classifier predicts: each test point's label, predicted label and probability (the
    # mirror's forward, Task.predictions) and each suspect's most probable label after calibration (new fields)
    "2026.12.14": {
        "06ecccd0a0b73397",
        "13740d5fa0eed12d",  # analyses return their typed result (contract/results.py stores it): the same JSON
        "55f1059d75084532",  # worker/analyses.py split into a module per kind: every definition as it was
        "8ba9caf133d91823",  # curvature methods register themselves (METHODS): the same estimates, dispatched
        "d23f7c2331dd6a96",  # the ANALYSES map left worker/analyses: each AnalysisSpec names its compute part
        "de5ceebaa4a2b49d",  # stacking "auto" timed on a slice of the first batch: the same two ways, chosen sooner
        # linear mode's "layers" way (layers.py): the same derivatives from one backward pass, agreeing with the
        # jvp to rounding (auto checks it on its probe); a Tail keeps its output gradients
        "11ad17404a775c9a",
        "e82f7a633029de7f",  # the layers way multiplies low-rank weight tangents as factors: the same sums
        "50d1705614c59efb",  # MirrorConfig.autocast, off by default (a method field: jobs that set it are new jobs)
        "79e169563bb91303",  # the layers way bounds each record's gradients held per layer (GRADIENTS_BYTES)
        "791ba53e774d639b",  # the tangents' rank is found only when the layers way runs
    },
}


def engine_fingerprint() -> str:
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "worker" / "forward_inf").glob("*.py"), *(ROOT / "worker" / "analyses").glob("*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        h.update(path.name.encode() + ast.unparse(tree).encode())  # source text, comments and layout aside
    return h.hexdigest()[:16]


def test_a_change_to_the_engine_comes_with_a_new_engine_version():
    assert engine_fingerprint() in ENGINE_FINGERPRINTS.get(ENGINE_VERSION, ()), (
        f"the engine's code changed (fingerprint {engine_fingerprint()}): bump contract.jobs.ENGINE_VERSION, "
        "or add the fingerprint to the current version's set if results do not change (see ENGINE_FINGERPRINTS)"
    )


def test_the_curvature_methods_are_the_preconditions_the_contract_names():
    """Each curvature method registers itself (worker/forward_inf/curvature.py METHODS); the contract's
    `precondition`, the engine's config and the curvature view name exactly those, besides auto and none."""
    from contract.schemas import CurvatureInfo
    from worker.forward_inf.config import MirrorConfig
    from worker.forward_inf.curvature import METHODS

    def names(annotation) -> set[str]:
        return set(typing.get_args(annotation)) - {"auto", "none"}

    contract = names(Method.model_fields["precondition"].annotation)
    engine = names(typing.get_type_hints(MirrorConfig)["precondition"])
    assert contract == engine == set(METHODS) == names(CurvatureInfo.model_fields["kind"].annotation)


# -- precedence: request > preset > the model's defaults > the engine's ---------------------------------
def test_precedence_request_over_preset_over_model_over_engine():
    model = MethodDefaults(optimizer="adam", lr=1e-3, mode="finite", damping=0.5)
    leakage = resolve_method(MethodSettings(), model, needs("leakage"))
    assert (leakage.lr, leakage.optimizer) == (PRESETS["leakage"]["lr"], "adam")  # preset over the model
    assert leakage.damping == 0.5  # the model's, where the preset is silent
    assert leakage.steps == Method().steps  # the engine's, where all are silent
    asked = resolve_method(MethodSettings(lr=0.2), model, needs("leakage"))
    assert asked.lr == 0.2  # the request over everything
    plain = resolve_method(MethodSettings(), model, needs("attribution"))
    assert (plain.lr, plain.mode) == (1e-3, "finite")  # the attribution preset names nothing: model defaults
    named = resolve_method(MethodSettings(preset="mislabeled"), model, needs("attribution"))
    assert named.group and named.score == "cosine" and named.mode == "linear"


def test_an_analysis_pins_what_it_reads_and_refuses_a_request_against_it():
    finite = MethodDefaults(mode="finite")
    mislabeled = resolve_method(MethodSettings(), finite, needs("mislabeled"))
    assert mislabeled.mode == "linear" and mislabeled.score == "cosine"  # the preset beats the manifest
    assert resolve_method(MethodSettings(), MethodDefaults(), needs("leakage")).score == "signed"  # pinned, not "match"
    for kind, spec in ANALYSES.items():
        for name, (allowed, _why) in spec.method.rules.items():
            other = next(v for v in CHOICES[name] if v not in allowed)
            with pytest.raises(MethodConflict, match=f"method.{name}: the {kind} analysis") as caught:
                resolve_method(MethodSettings(**{name: other}), MethodDefaults(), spec.method)
            assert caught.value.fields == [name]
    with pytest.raises(MethodConflict, match="needs mode='linear'"):
        resolve_method(MethodSettings(mode="finite"), MethodDefaults(), needs("mislabeled"))  # the preset's cosine


# -- identity: everything the result depends on, nothing else ---------------------------------------------
def test_the_key_hashes_every_input_of_the_result():
    records = RecordPoints(dataset=DatasetRef(id="t", digest="a" * 64), indices=[0, 1])
    base = AttributionJob(
        model=ModelRef(id="m", digest="b" * 64),
        dataset=DatasetRef(id="d", digest="c" * 64),
        dtype="float32",
        method=Method(),
        test=records,
    )
    changes = {
        "model": ModelRef(id="m", digest="0" * 64),
        "dataset": DatasetRef(id="d", digest="0" * 64),
        "test": records.model_copy(update={"dataset": DatasetRef(id="t", digest="0" * 64)}),
        "dtype": "float64",
        "method": Method(lr=0.5),
        "engine_version": ENGINE_VERSION + "+1",
    }
    keys = {base.key} | {base.model_copy(update={k: v}).key for k, v in changes.items()}
    assert len(keys) == 1 + len(changes)
    assert AttributionJob(**base.model_dump()).key == base.key  # and it is a function of the payload alone
    inline = base.model_copy(update={"test": InlinePoints(inputs=[[0.0, 1.0]], targets=[1])})
    assert inline.key != base.key
    assert inline.model_copy(update={"test": InlinePoints(inputs=[[0.0, 1.5]], targets=[1])}).key != inline.key


# -- the request path re-reads, it never re-hashes --------------------------------------------------------
def test_verified_reads_hash_each_file_version_once(registry_dir, tmp_path):
    import shutil

    from contract import datafiles
    from contract import registry as reg

    root = tmp_path / "registry"
    shutil.copytree(registry_dir, root)
    dataset = reg.Registry(root).dataset("digits-train")
    datafiles._digest.cache_clear()
    first = dataset.read([0, 5, 1400])
    for _ in range(5):
        np.testing.assert_array_equal(dataset.read([0, 5, 1400])["inputs"], first["inputs"])
    assert datafiles._digest.cache_info().misses == 2  # each of the two shards hashed once
    np.testing.assert_array_equal(first["inputs"][2], dataset.rows(1)["inputs"][1400 - dataset.shards[0].size])
    shard = root / "datasets" / "digits-train" / dataset.shards[0].file
    changed = bytearray(shard.read_bytes())
    changed[-1] ^= 0xFF
    shard.write_bytes(changed)  # a changed file is hashed again, and refused
    with pytest.raises(reg.RegistryError, match="sha256"):
        dataset.read([0])


def test_every_type_keyed_by_kind_is_built_from_the_one_registry():
    """A kind is stated once (contract/kinds.py): the literals, the payload and result unions, the routes and
    each spec's parts in the API and the worker all come from the registry, and agree with it."""
    from app.main import create_app
    from contract.kinds import JOB, AnalysisKind, AnalysisPublic, AnalysisResult, Job, JobSummary, Kind
    from contract.settings import Settings

    def kinds(union) -> set[str]:  # the `kind` of each member of a discriminated union
        members = typing.get_args(typing.get_args(union)[0])
        return {m.model_fields["kind"].default for m in members}

    every, analyses = set(typing.get_args(Kind)), set(typing.get_args(AnalysisKind))
    assert analyses == set(ANALYSES) == kinds(AnalysisResult) and every == {"attribution"} | analyses
    assert kinds(Job) == every | {"index"} and JOB.json_schema()["discriminator"]["propertyName"] == "kind"
    assert set(typing.get_args(AnalysisPublic.model_fields["kind"].annotation)) == analyses
    assert set(typing.get_args(JobSummary.model_fields["kind"].annotation)) == every
    paths = create_app(Settings()).openapi()["paths"]
    for kind, spec in ANALYSES.items():
        assert paths[f"/v1/analyses/{kind}"]["post"]["operationId"] == f"create_{kind}_analysis"
        assert all(callable(spec.part(part)) for part in ("resolve", "report", "compute"))
        assert spec.method.kind == kind and family_of(kind) == "analysis"
    assert family_of("attribution") == "attribution" and needs("attribution").rules == {}


def test_a_kind_is_refused_where_its_types_do_not_name_it():
    spec = ANALYSES["leakage"]
    with pytest.raises(ValueError, match="the name 'leakage' is taken"):
        register(spec)
    with pytest.raises(ValueError, match=r"MislabeledResult.kind must be Literal\['other'\]"):
        register(dataclasses.replace(spec, kind="other", result=ANALYSES["mislabeled"].result))
    assert set(ANALYSES) == {"leakage", "mislabeled", "memorization"}
