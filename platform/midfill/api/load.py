"""Parse untrusted YAML/JSON into typed resources, with errors that name the field and the fix."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from midfill.api.common import API_VERSION
from midfill.api.modelrelease import ModelRelease
from midfill.api.trainingrun import TrainingRun

Resource = TrainingRun | ModelRelease
KINDS: dict[str, type[BaseModel]] = {"TrainingRun": TrainingRun, "ModelRelease": ModelRelease}
# Plural and short names accepted on the command line (as kubectl does).
KIND_ALIASES = {
    "trainingrun": "TrainingRun",
    "trainingruns": "TrainingRun",
    "tr": "TrainingRun",
    "modelrelease": "ModelRelease",
    "modelreleases": "ModelRelease",
    "mr": "ModelRelease",
}
_RELATIVE_FIELD = re.compile(r"^([A-Za-z][\w.\[\]'/-]*): (.+)$", re.S)


@dataclass(frozen=True)
class FieldError:
    """One problem: the dotted path of the field (e.g. spec.parallelism.numNodes) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A document that is not a valid resource; `errors` lists every field at fault."""

    def __init__(self, errors: list[FieldError], *, source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(str(e) for e in errors))


def normalize_kind(name: str) -> str:
    """'tr', 'trainingruns', 'TrainingRun' -> 'TrainingRun'; ValueError naming the choices otherwise."""
    kind = KIND_ALIASES.get(name.lower())
    if kind is None:
        raise ValueError(f"unknown kind {name!r}; use one of trainingruns (tr) or modelreleases (mr)")
    return kind


def _dotted(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The wire names of fields accepted at `loc` (for 'did you mean' hints on unknown fields)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        for arg in args:  # list[Model]
            candidates += [a for a in getattr(arg, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = candidates[0] if candidates else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def errors_from_validation(exc: ValidationError, model: type[BaseModel]) -> list[FieldError]:
    """Turn pydantic's errors into FieldErrors with wire (camelCase) paths and readable reasons."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            message = f"unknown field; remove it or fix its spelling ({hint})"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif err["type"] == "literal_error":
            message = f"{err.get('input')!r} is not allowed; {message[0].lower()}{message[1:]}"
        elif (
            "input" in err
            and err["type"] not in ("value_error", "assertion_error")
            and not isinstance(err["input"], (dict, list))
        ):
            message = f"{message} (got {err['input']!r})"
        path = _dotted(loc)
        relative = _RELATIVE_FIELD.match(message)
        if err["type"] == "value_error" and relative:
            path = f"{path}.{relative.group(1)}" if path else relative.group(1)
            message = relative.group(2)
        out.append(FieldError(path or "(document)", message))
    return out


def parse_resource(doc: Any, *, source: str = "") -> Resource:
    """Validate one decoded document as a TrainingRun or ModelRelease."""
    if not isinstance(doc, dict):
        raise SpecError(
            [
                FieldError(
                    "(document)", f"expected a mapping with apiVersion/kind/metadata/spec, got {type(doc).__name__}"
                )
            ],
            source=source,
        )
    kind = doc.get("kind")
    if kind not in KINDS:
        raise SpecError([FieldError("kind", f"unknown kind {kind!r}; midfill knows {', '.join(KINDS)}")], source=source)
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(
            [FieldError("apiVersion", f"{doc.get('apiVersion')!r} is not supported; use {API_VERSION}")], source=source
        )
    model = KINDS[kind]
    try:
        return model.model_validate(doc)  # type: ignore[return-value]
    except ValidationError as exc:
        raise SpecError(errors_from_validation(exc, model), source=source) from None


def load_documents(text: str, *, source: str = "") -> list[Any]:
    """Decode a YAML stream (one or more documents); YAML errors name the line."""
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([FieldError(where, f"invalid YAML: {problem}")], source=source) from None


def load_file(path: str | Path) -> list[Resource]:
    """Parse every resource in a YAML file; SpecError lists all problems of the first bad document."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([FieldError("(file)", f"cannot read: {exc.strerror}")], source=str(path)) from None
    docs = load_documents(text, source=str(path))
    if not docs:
        raise SpecError([FieldError("(file)", "no documents found")], source=str(path))
    return [parse_resource(d, source=str(path) if len(docs) == 1 else f"{path}[{i}]") for i, d in enumerate(docs)]
