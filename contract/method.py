"""Forward-INF method settings as the service takes them: the fields, the measured presets, what each
analysis needs, and the one precedence order that resolves a request's settings.

    request  >  preset (the request's `preset`, else the analysis')  >  the model's defaults  >  engine defaults

`Method` is the resolved form (every field set, the engine's defaults as defaults): what a job payload
carries and the worker runs. `MethodDefaults` (a model manifest's `method`) and `MethodSettings` (a
request's `method`) are the same fields with every one optional; None means "not set here".

The engine's `MirrorConfig` (worker/forward_inf/config.py) states the same fields for library users; it
cannot import this package (the engine imports nothing of the service), so tests/test_contract.py fails
when the two differ in a field, a choice, a default, a preset or a rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

__all__ = [
    "PRESETS",
    "Family",
    "Method",
    "MethodConflict",
    "MethodDefaults",
    "MethodSettings",
    "ATTRIBUTION",
    "Needs",
    "family_of",
    "whole",
    "resolve_method",
]


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole(**constraints: int) -> Any:
    """An integer field as JSON Schema means it: any integral number (376.0 is 376), never a string or a
    bool; `constraints`: ge, le."""
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_whole)]


# The kinds of job a tenant submits are contract/kinds.py's (attribution and each registered analysis)
Family = Literal["attribution", "analysis"]  # which routes serve a kind: /v1/attributions or /v1/analyses


def family_of(kind: str) -> Family:
    return "attribution" if kind == "attribution" else "analysis"


PresetName = Literal["attribution", "leakage", "mislabeled"]
# finite mode subtracts two losses a small step apart: at bf16's 3 digits the difference is rounding
AUTOCAST_LINEAR = "autocast needs mode='linear' (finite mode's loss differences vanish in reduced precision)"


class Method(BaseModel):
    """Fully resolved Forward-INF settings (the engine's MirrorConfig fields that a request may set).
    Numbers and flags are strict: `false` is not a damping, nor `1` a group flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["sgd", "adam", "signsgd"] = Field("sgd", description="update rule of the mirrored step")
    lr: Annotated[float, Field(strict=True, gt=0, le=100)] = Field(1e-3, description="step size")
    steps: whole(ge=1, le=20) = Field(1, description="mirrored steps (linear mode: the first)")
    direction: Literal["ascent", "descent"] = Field("ascent", description="ascent = unlearn the test point")
    mode: Literal["finite", "linear"] = Field(
        "linear", description="finite = take the step; linear = exact first order"
    )
    params: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        ("*",), min_length=1, max_length=32, description="name globs of the parameters to perturb"
    )
    score: Literal["signed", "abs", "match", "relative", "cosine"] = Field(
        "signed", description="how a loss change is scored"
    )
    group: Annotated[bool, Field(strict=True)] = Field(
        False, description="one step on the mean loss of all test points, one score row"
    )
    safeguard: Literal["normalize", "none"] = Field("normalize", description="memorised test points under SGD")
    precondition: Literal["auto", "none", "diag", "hessian", "lowrank", "kfac", "ekfac"] = Field(
        "auto",
        description="step along H^-1 g: linear scores become influence-function scores. hessian: exact (small "
        "models); lowrank: the Hessian's top eigenpairs down to a tenth of the damping, the rest taken as 0 (its cost "
        "grows with the eigenvalues above the damping, not with the parameters); diag: diagonal Fisher; kfac/ekfac: "
        "Kronecker-factored, any size (nn.Linear and nn.Conv2d layers only; others are left unperturbed); auto: the "
        "low-rank Hessian where affordable",
    )
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none",
        description="linear mode: the sweep's forward (and backward) in this precision by torch.autocast, the "
        "mirrored step and the curvature at full precision; faster where the hardware has it (GPUs, CPUs with bf16 "
        "units), scores to about 2-3 significant digits (docs/benchmarks.md, 'Reduced precision')",
    )
    damping: Annotated[float, Field(strict=True, ge=0, le=1e6)] | Literal["auto"] = Field(
        "auto",
        description="added to the curvature's diagonal; auto: the weight decay the model was trained with, read "
        "off its gradient (at an optimum of loss + decay/2 |W|^2 the gradient is -decay W), else a measured rule per "
        "curvature kind; the value used and why are in the job's execution",
    )

    @model_validator(mode="after")
    def _combine(self):
        if self.score == "cosine" and self.mode != "linear":
            raise ValueError("score='cosine' needs mode='linear' (a unit-norm first-order step)")
        if self.precondition != "none" and self.damping != "auto" and self.damping <= 0:
            raise ValueError("precondition needs damping > 0 (a classifier's curvature is singular without it)")
        if self.autocast != "none" and self.mode != "linear":
            raise ValueError(AUTOCAST_LINEAR)
        return self


def _optional(model: type[BaseModel], name: str, doc: str) -> Any:
    """`model` with every field optional (None = not set), its constraints and descriptions kept."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[key] = (kind | None, Field(None, description=info.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields)


MethodDefaults = _optional(Method, "MethodDefaults", "A model's default method settings (its manifest's `method`).")


class MethodSettings(MethodDefaults):  # type: ignore[misc, valid-type]
    """Forward-INF settings of a request. Unset fields come from the preset, then the model's defaults,
    then the engine's (docs/benchmarks.md has the evidence behind the presets)."""

    preset: PresetName | None = Field(None, description="named, measured setting (default: the analysis')")


# Chosen by measurement (python -m bench.quality; docs/benchmarks.md): a preset sets only the fields it
# names. attribution: the engine's defaults (a curvature-preconditioned first-order step); leakage: a
# finite Adam step and the duplicate-matching score; mislabeled: group mode over a clean reference set.
PRESETS: dict[str, dict[str, Any]] = {
    "attribution": {},
    "leakage": {"mode": "finite", "optimizer": "adam", "lr": 0.05, "score": "match", "precondition": "none"},
    "mislabeled": {"mode": "linear", "group": True, "score": "cosine", "precondition": "diag", "damping": 1e-3},
}


@dataclass(frozen=True)
class Needs:
    """What a kind of job needs of the method: its preset, and the values of the fields it reads off the
    engine (worker/analyses) that it can honour: field -> (allowed values, the first taken when a preset or
    the model's defaults say otherwise; why). An analysis states its own (contract/kinds.py)."""

    kind: str = "attribution"
    preset: PresetName = "attribution"
    rules: Mapping[str, tuple[tuple, str]] = field(default_factory=dict)


ATTRIBUTION = Needs()  # an attribution's: the attribution preset, every value honoured


class MethodConflict(ValueError):
    """A requested setting the analysis cannot honour, or settings that do not combine."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def resolve_method(requested: MethodSettings, model_defaults: MethodDefaults, needs: Needs = ATTRIBUTION) -> Method:
    """The settings a job runs: request > preset (the request's, else the kind's) > the model's defaults >
    the engine's. A field the kind pins (`needs.rules`) is pinned silently when a preset or the model's
    defaults disagree, and is a MethodConflict when the request asks for it."""
    asked = requested.model_dump(exclude_none=True, exclude={"preset"})
    merged = {**model_defaults.model_dump(exclude_none=True), **PRESETS[requested.preset or needs.preset], **asked}
    for name, (allowed, why) in needs.rules.items():
        if merged.get(name, Method.model_fields[name].default) not in allowed:
            if name in asked:
                choices = " or ".join(repr(v) for v in allowed)
                raise MethodConflict(f"method.{name}: the {needs.kind} analysis needs {choices} ({why})", [name])
            merged[name] = allowed[0]
    try:
        return Method(**merged)
    except ValidationError as exc:
        fields = [str(e["loc"][0]) for e in exc.errors() if e["loc"]]
        reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise MethodConflict(f"method: {reason} (after the preset and the model's defaults)", fields) from None
