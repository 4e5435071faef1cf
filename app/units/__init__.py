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
from app.errors import HostError, VmfarmError
from app.providers.base import Host
from app.units import copy, download, release, script, setup  # noqa: F401 (they register)
from app.units.base import (
    UNIT_TYPES,
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


def unit_type(name: str) -> UnitType[Any]:
    """The registered type of that name (the loader has refused any other)."""
    try:
        return UNIT_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown command unit type {name!r} (known: "
                         f"{', '.join(sorted(UNIT_TYPES))})") from None


def host_context(host: Host, stage: dict[str, Any]) -> Context:
    """The expressions one host renders with: the stage's values and the host's own."""
    ctx = Context()
    for k, v in stage.get("externalValues", {}).items():
        ctx.set(k, v, external=True)
    for k, v in {
        "instance.name": host.name, "instance.hostName": host.address,
        "instance.host.hostName": host.address,
        "instance.host.privateIp": host.private_ip or host.address,
        "instance.host.publicIp": host.public_ip or host.address,
        "instance.host.port": host.port, "instance.host.region": host.region,
        "infra.region": host.region,
    }.items():
        ctx.set(k, v, external=True)
    return ctx


def step_scope(stage: Mapping[str, Any], step: Mapping[str, Any], ctx: Context, *,
               secrets: bool = False) -> Scope:
    """What the units of a Command step render with on one host (``ctx``: ``host_context``,
    plus what the worker read from the ledger)."""
    return Scope(ctx=ctx, artifact=stage.get("artifact") or {},
                 outputs=tuple(step["spec"].get("outputVariables", [])), secrets=secrets)


def step_environment(step: Mapping[str, Any], ctx: Context, *,
                     secrets: bool = False) -> dict[str, str]:
    """The step's environmentVariables rendered for one host (secrets resolved on the worker
    only)."""
    def value(raw: Any) -> str:
        text = render(str(raw), ctx)
        return with_secrets(text) if secrets else text

    return {v["name"]: value(v["value"]) for v in step["spec"].get("environmentVariables", [])
            if v.get("value") is not None}


def run_unit(unit: Mapping[str, Any], scope: Scope, session: HostSession) -> Outcome:
    """Render one unit and run that rendering (the worker's way); a host error it raises names
    the unit."""
    kind = unit_type(str(unit["type"]))
    try:
        rendered = kind.render(unit, scope)
        if rendered.problem:  # it cannot run as written: nothing touches the host
            return Outcome.failed(rendered.problem)
        return kind.run(rendered, session)
    except HostError as exc:
        exc.unit = exc.unit or str(unit["identifier"])
        raise


def render_unit(unit: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    """One unit as ``vmfarm plan`` shows it; a unit that cannot be rendered shows why."""
    try:
        shown: dict[str, Any] = unit_type(str(unit["type"])).render(unit, scope).to_dict()
    except VmfarmError as exc:  # an artifact the spec cannot name: the run would fail so
        return {"identifier": unit["identifier"], "type": unit["type"],
                "problem": getattr(exc, "message", None) or str(exc)}
    return shown


def describe_unit(shown: Mapping[str, Any]) -> list[str]:
    """Lines of the text plan for one rendered unit (its JSON form)."""
    if shown.get("problem"):
        return problem_lines(shown)
    return unit_type(str(shown["type"])).describe(shown)


def render_step(stage: dict[str, Any], step: dict[str, Any],
                host: Host | None) -> dict[str, Any]:
    """A step as it would run on ``host``: every command unit rendered by its type, unsafe
    values shown as the environment variables they travel in (for ``vmfarm plan``)."""
    out: dict[str, Any] = {"identifier": step["identifier"], "type": step["type"]}
    ctx = host_context(host, stage) if host else Context()
    spec = step["spec"]
    if step["type"] == "HealthCheck":
        out["check"] = {k: render(str(v), ctx) if isinstance(v, str) else v
                        for k, v in spec.items()}
        return out
    out["onDelegate"] = bool(spec.get("onDelegate"))
    out["environment"] = step_environment(step, ctx)
    scope = step_scope(stage, step, ctx)
    out["units"] = [render_unit(unit, scope) for unit in spec["commandUnits"]]
    return out
