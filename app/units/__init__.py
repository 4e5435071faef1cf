"""Command units: one module per unit type, each with ``render()`` (what ``vmfarm plan`` shows)
and ``run()`` (what the worker does with that same rendering).

    base.py       the UnitType interface, Scope / HostSession / Rendered / Outcome, the registry
    script.py     Script: a bash script, unsafe values in its environment, output variables
    copy.py       Copy: the worker fetches the artifact and pushes it over SFTP
    download.py   DownloadArtifact: the host fetches the artifact itself
    setup.py      Setup: create the runtime paths, with owner and mode
    release.py    Release: releases/<version>, ``current`` switched atomically, keep N

This module looks types up (``unit_type``), renders a whole step for ``vmfarm plan``
(``render_step``) and runs one unit for the worker (``run_unit``); both render through the
unit type's ``render``. ``host_context`` is the expression context of one host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.definitions.expressions import Context, render
from app.definitions.plan import (
    ApprovalStepPlan,
    CommandStepPlan,
    DeploymentStagePlan,
    HealthCheckStepPlan,
    HttpStepPlan,
    StepPlan,
    WaitStepPlan,
)
from app.errors import HostError, VmfarmError
from app.providers.base import Host
from app.units import copy, download, release, script, setup  # noqa: F401 (they register)
from app.units.base import (
    UNIT_TYPES,
    CommandUnit,
    HostSession,
    Outcome,
    Rendered,
    Scope,
    UnitType,
    problem_lines,
    with_secrets,
)
from app.units.release import RELEASES_OUTPUT

__all__ = [
    "RELEASES_OUTPUT",
    "HostSession",
    "Outcome",
    "Rendered",
    "Scope",
    "UnitType",
    "describe_unit",
    "host_context",
    "render_step",
    "run_unit",
    "step_environment",
    "step_scope",
    "unit_type",
]


def unit_type(name: str) -> UnitType[Any, Any]:
    """The registered type of that name (the loader has refused any other)."""
    try:
        return UNIT_TYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown command unit type {name!r} (known: {', '.join(sorted(UNIT_TYPES))})"
        ) from None


def host_context(host: Host, stage: DeploymentStagePlan) -> Context:
    """The expressions one host renders with: the stage's values and the host's own."""
    ctx = Context()
    for k, v in stage.external_values.items():
        ctx.set(k, v, external=True)
    own: dict[str, object] = {
        "instance.name": host.name,
        "instance.hostName": host.address,
        "instance.host.hostName": host.address,
        "instance.host.privateIp": host.private_ip or host.address,
        "instance.host.publicIp": host.public_ip or host.address,
        "instance.host.port": host.port,
        "instance.host.region": host.region,
        "infra.region": host.region,
    }
    for k, value in own.items():
        ctx.set(k, value, external=True)
    return ctx


def step_scope(
    stage: DeploymentStagePlan, step: CommandStepPlan, ctx: Context, *, secrets: bool = False
) -> Scope:
    """What the units of a Command step render with on one host (``ctx``: ``host_context``,
    plus what the worker read from the ledger)."""
    return Scope(
        ctx=ctx, artifact=stage.artifact, outputs=tuple(step.spec.output_variables), secrets=secrets
    )


def step_environment(
    step: CommandStepPlan, ctx: Context, *, secrets: bool = False
) -> dict[str, str]:
    """The step's environmentVariables rendered for one host (secrets resolved on the worker
    only)."""

    def value(raw: Any) -> str:
        text = render(str(raw), ctx)
        return with_secrets(text) if secrets else text

    return {v.name: value(v.value) for v in step.spec.environment_variables if v.value is not None}


def run_unit(unit: CommandUnit, scope: Scope, session: HostSession) -> Outcome:
    """Render one unit and run that rendering (the worker's way); a host error it raises names
    the unit."""
    kind = unit_type(unit.type)
    try:
        rendered = kind.render(unit, scope)
        if rendered.problem:  # it cannot run as written: nothing touches the host
            return Outcome.failed(rendered.problem)
        return kind.run(rendered, session)
    except HostError as exc:
        exc.unit = exc.unit or unit.identifier
        raise


def render_unit(unit: CommandUnit, scope: Scope) -> dict[str, Any]:
    """One unit as ``vmfarm plan`` shows it; a unit that cannot be rendered shows why."""
    try:
        shown: dict[str, Any] = unit_type(unit.type).render(unit, scope).to_dict()
    except VmfarmError as exc:  # an artifact the spec cannot name: the run would fail so
        return {
            "identifier": unit.identifier,
            "type": unit.type,
            "problem": getattr(exc, "message", None) or str(exc),
        }
    return shown


def describe_unit(shown: Mapping[str, Any]) -> list[str]:
    """Lines of the text plan for one rendered unit (its JSON form)."""
    if shown.get("problem"):
        return problem_lines(shown)
    return unit_type(str(shown["type"])).describe(shown)


def render_step(stage: DeploymentStagePlan, step: StepPlan, host: Host | None) -> dict[str, Any]:
    """A step as it would run on ``host``: every command unit rendered by its type, unsafe
    values shown as the environment variables they travel in (for ``vmfarm plan``)."""
    out: dict[str, Any] = {
        "identifier": step.identifier,
        "type": getattr(step, "written_as", None) or step.type,
    }
    ctx = host_context(host, stage) if host else Context()
    if isinstance(step, HealthCheckStepPlan):
        out["check"] = {
            k: render(str(v), ctx) if isinstance(v, str) else v
            for k, v in step.spec.to_json().items()
        }
        return out
    if not isinstance(step, CommandStepPlan):  # Http, Wait, HarnessApproval: as written
        spec = step.spec.to_json()
        if isinstance(step, HttpStepPlan):  # the assertion names the response: kept as is
            spec = {
                k: v if k == "assertion" or not isinstance(v, str) else render(v, ctx)
                for k, v in spec.items()
            }
        out["onDelegate"] = not isinstance(step, WaitStepPlan | ApprovalStepPlan)
        out["spec"] = spec
        if hasattr(step, "repositories"):  # Terraform steps: their Git stores' repositories
            out["repositories"] = step.repositories
        return out
    out["onDelegate"] = step.spec.on_delegate
    out["environment"] = step_environment(step, ctx)
    scope = step_scope(stage, step, ctx)
    out["units"] = [render_unit(unit, scope) for unit in step.spec.command_units]
    return out
