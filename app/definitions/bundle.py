"""What a load holds: every document by kind and identifier, the runtime inputs it found, and
the error collector that reports every problem of a load at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.definitions import models as m
from app.definitions.yamlload import Document
from app.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    pass


YAML_SUFFIXES = (".yaml", ".yml")


MAX_ERRORS = 50


@dataclass
class Loaded:
    """A validated document: its model, the raw data, and where it came from."""

    kind: str
    ident: str
    model: Any
    doc: Document
    base: tuple[str | int, ...] = ()  # where this object's data sits inside doc.data

    @property
    def raw(self) -> Any:
        data = self.doc.data
        for p in self.base:
            data = data[p]
        return data

    def error(self, message: str, path: Sequence[str | int] = ()) -> SpecError:
        return self.doc.error(message, (*self.base, *path))


@dataclass
class InputSlot:
    """A ``<+input>`` in the files: where it is and how ``--set`` names it."""

    name: str  # e.g. service.web_app_vm.artifacts.primary.spec.tag
    doc: Document
    path: tuple[str | int, ...]
    options: dict[str, object]


@dataclass
class Bundle:
    """Every document of a load, by kind and identifier."""

    documents: list[Document] = field(default_factory=list)
    services: dict[str, Loaded] = field(default_factory=dict)
    environments: dict[str, Loaded] = field(default_factory=dict)
    infrastructures: dict[str, Loaded] = field(default_factory=dict)
    pipelines: dict[str, Loaded] = field(default_factory=dict)
    connectors: dict[str, Loaded] = field(default_factory=dict)
    inputs: list[InputSlot] = field(default_factory=list)
    # Hook (templates): the Template documents of the load, set aside by
    # app.definitions.templates.expand_templates (their bodies are expanded where they are used).
    templates: list[Document] = field(default_factory=list)
    # (file, path) of every value that came from a runtime input: quoted in scripts.
    external: set[tuple[str, int, tuple[str | int, ...]]] = field(default_factory=set)
    # Hook (chaining): pipeline identifier -> its variables written <+input> in the files.
    chain_inputs: dict[str, set[str]] = field(default_factory=dict)

    def by_kind(self, kind: str) -> dict[str, Loaded]:
        return {
            "Service": self.services,
            "Environment": self.environments,
            "Infrastructure": self.infrastructures,
            "Pipeline": self.pipelines,
            "Connector": self.connectors,
        }[kind]


class Collector:
    def __init__(self) -> None:
        self.errors: list[SpecError] = []

    def add(self, err: SpecError) -> None:
        if len(self.errors) < MAX_ERRORS and str(err) not in {str(e) for e in self.errors}:
            self.errors.append(err)

    def absorb(self, exc: SpecError | SpecErrors) -> None:
        """Keep every error of ``exc`` (one, or several)."""
        for e in exc.errors if isinstance(exc, SpecErrors) else [exc]:
            self.add(e)

    def raise_if_any(self) -> None:
        if self.errors:
            self.errors.sort(key=lambda e: (e.file, e.line, e.col))
            raise SpecErrors(self.errors) if len(self.errors) > 1 else self.errors[0]


def get_at(data: Any, path: tuple[str | int, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


def set_at(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def provider_of(infra: m.InfrastructureSpec) -> str:
    """``static``, ``aws``, ``azure`` or ``gcp``."""
    t = infra.spec.type
    hf = infra.spec.spec.host_filter.type if infra.spec.spec.host_filter else ""
    if t == "Pdc":
        return "static"
    if t == "SshWinRmAws" or hf == "AwsInstanceFilter":
        return "aws"
    if t == "SshWinRmAzure" or hf.startswith("Azure"):
        return "azure"
    if t == "SshWinRmGcp" or hf.startswith("Gcp"):
        return "gcp"
    if infra.spec.spec.hosts:
        return "static"
    return "aws" if infra.spec.spec.region and infra.spec.spec.connector_ref else "static"


def missing(kind: str, ref: str, table: Mapping[str, Loaded]) -> str:
    close = difflib.get_close_matches(ref, list(table), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    known = ", ".join(sorted(table)) or "none loaded"
    return f"{kind} '{ref}' is not defined in the given files{hint} (defined: {known})"
