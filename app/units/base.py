"""The unit-type interface and its registry.

A command unit type turns one ``commandUnits`` entry into a ``Rendered`` record (plain data)
with ``render``, and carries that record out on a host with ``run``. ``vmfarm plan`` prints the
record; the worker runs it. There is one rendering function per type, so what the plan shows
is what the worker does::

    rendered = unit_type("Setup").render(unit, scope)      # plan and worker alike
    rendered.to_dict()                                       # vmfarm plan (-o json)
    unit_type("Setup").run(rendered, session)                # the worker, on the host

A type registers itself with ``@register``; ``app.units`` imports every module of the package,
so looking a type up never depends on which module was imported first.

This package may import app/definitions, app/providers.base, app/connectors.base,
app/artifacts, app/secrets and app/errors. It never imports the coordinator, the ledger (SQL)
or Celery: what a unit needs from the ledger (the rollback version, earlier outputs) is put in
its ``Scope`` by app/execution.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from app.connectors.base import Connector
from app.definitions.expressions import Binder, Context
from app.definitions.models import (
    CopyUnit,
    DownloadArtifactUnit,
    ReleaseUnit,
    ScriptUnit,
    SetupUnit,
    StepVariable,
)
from app.definitions.plan import ArtifactPlan
from app.providers.base import Host

# A command unit as the plan holds it (the file schema's own models).
CommandUnit = ScriptUnit | CopyUnit | DownloadArtifactUnit | ReleaseUnit | SetupUnit


class Output(Protocol):
    """Where a unit's output goes: the worker's LogSink (secrets masked, output variables
    picked out), or a list in a test."""

    def write(self, stream: str, text: str) -> None:
        """Take a chunk of ``stream`` ("stdout" or "stderr") as it arrives."""


@dataclass(frozen=True)
class Scope:
    """What every unit of one step renders with on one host."""

    ctx: Context  # the host's expression context (and, on the worker, what the ledger knows)
    artifact: ArtifactPlan | None  # the stage's artifact
    outputs: Sequence[StepVariable] = ()  # the step's outputVariables

    @property
    def artifact_json(self) -> dict[str, Any]:
        """The artifact as app.artifacts reads it ({} when the service has none)."""
        return self.artifact.to_json() if self.artifact else {}

    @property
    def file_name(self) -> str:
        """The name the artifact's file takes on the host."""
        return str(self.artifact.file_name if self.artifact else None)

    # Resolve <+secrets.getValue("id")>: only on the worker that runs the step, never for plan.
    secrets: bool = False


@dataclass(frozen=True)
class HostSession:
    """A unit's view of the worker while it runs: the connection, the host, where output goes,
    the time left and the step's environment."""

    conn: Connector
    host: Host
    out: Output
    timeout: float  # seconds left of the step's deadline
    env: Mapping[str, str] = field(default_factory=dict)  # environmentVariables, rendered
    execution_id: str | None = None  # one artifact fetch per execution, however many hosts


# The metadata of a Rendered field that the worker needs and the plan does not show.
HIDDEN = {"hidden": True}


@dataclass(frozen=True, kw_only=True)
class Rendered:
    """A unit as it will run on one host, as plain data (its JSON form is ``to_dict``)."""

    identifier: str
    type: str
    # Why this unit cannot run as written (plan shows it; run fails with it, touching nothing).
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as ``vmfarm plan -o json`` shows it (hidden fields left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("hidden"):
                continue
            value = getattr(self, f.name)
            if f.name == "problem" and value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Outcome:
    """What running one unit did: success, or a failure with its error class and message."""

    exit_code: int | None = 0
    error: str | None = None
    error_class: str = "Unknown"
    # Output variables the unit sets itself (Release: the releases the host holds).
    outputs: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(
        cls, error: str, *, exit_code: int | None = None, error_class: str = "Unknown"
    ) -> Outcome:
        return cls(exit_code=exit_code, error=error, error_class=error_class)


R = TypeVar("R", bound=Rendered)
U = TypeVar("U", bound=CommandUnit)


class UnitType(ABC, Generic[U, R]):
    """One ``type`` of command unit. Subclasses set ``type`` and register with ``@register``."""

    type: ClassVar[str]

    @abstractmethod
    def render(self, unit: U, scope: Scope) -> R:
        """The unit as it will run on the scope's host; no I/O beyond reading local files."""

    @abstractmethod
    def run(self, rendered: R, session: HostSession) -> Outcome:
        """Carry out a rendering on the host; host errors raise, a failed command is data."""

    @abstractmethod
    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        """Lines for the text plan, from the record's JSON form (continuation lines indented)."""


UNIT_TYPES: dict[str, UnitType[Any, Any]] = {}

T = TypeVar("T", bound=type[UnitType[Any, Any]])


def register(cls: T) -> T:
    """Class decorator: make ``cls`` the unit type for its ``type`` name."""
    UNIT_TYPES[cls.type] = cls()
    return cls


def with_secrets(text: str, *, bind: Callable[[str], str] | Binder | None = None) -> str:
    """Resolve ``<+secrets.getValue("id")>`` here, on the worker that runs the step; with
    ``bind`` (a script) each value becomes an environment variable of the command."""
    from app.secrets import has_refs, substitute

    if not has_refs(text):
        return text
    out, _ = substitute(text, bind=bind)
    return out


def problem_lines(shown: Mapping[str, Any]) -> list[str]:
    """The text plan's lines for a unit that cannot run."""
    return [f"[{shown['identifier']}] {str(shown['type']).lower()}: cannot run: {shown['problem']}"]
