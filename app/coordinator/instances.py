"""The Instance ledger: which version runs where, and the releases each host holds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlmodel import Session, col, select

from app.coordinator.ledger import deployment_stage, stage_data
from app.models import (
    Execution,
    HostStepRun,
    Instance,
    StageRun,
    utcnow,
)
from app.settings import get_settings


def record_instances(
    s: Session, ex: Execution, run: StageRun, hosts: list[str], phase: int | None = None
) -> None:
    """Update the per-host ledger: which version now runs where."""
    if not hosts or get_settings().test_connection:
        return  # (VMFARM_TEST_CONNECTION: nothing ran on the hosts, nothing was deployed)
    stage = deployment_stage(ex, run.stage_index)
    version = stage.artifact.tag if stage.artifact else None
    by_name = stage_data(s, ex, run).by_name
    svc, env = stage.service.identifier, stage.environment.identifier
    by_infra: dict[str, list[str]] = {}
    for name in hosts:
        by_infra.setdefault(by_name[name]["infrastructure"], []).append(name)
    # By the whole unique key (service, environment, infrastructure, host): index lookups
    # per host, not a scan of every instance the service has (that grew with every phase).
    existing: dict[tuple[str, str], Instance] = {}
    for infra, names in by_infra.items():
        for i in s.exec(
            select(Instance).where(
                Instance.service == svc,
                Instance.environment == env,
                Instance.infrastructure == infra,
                col(Instance.host).in_(names),
            )
        ).all():
            existing[(i.infrastructure, i.host)] = i
    held = releases_held(s, ex.id, run.stage_index, hosts, kind="deploy", phase=phase)
    now = utcnow()
    new: list[dict[str, Any]] = []
    for name in hosts:
        h = by_name[name]
        inst = existing.get((h["infrastructure"], name))
        if inst is None:  # rows, not model objects: building one costs more than its insert
            new.append(
                {
                    "service": svc,
                    "environment": env,
                    "infrastructure": h["infrastructure"],
                    "host": name,
                    "region": h["region"],
                    "version": version,
                    "previous_version": None,
                    "execution_id": ex.id,
                    "previous_execution_id": None,
                    "releases": held.get(name),
                    "updated_at": now,
                }
            )
            continue
        if inst.version != version:
            inst.previous_version = inst.version
            inst.previous_execution_id = inst.execution_id
        if name in held:
            inst.releases = held[name]
        inst.version, inst.execution_id, inst.updated_at = version, ex.id, now
        inst.region = h["region"]
        s.add(inst)
    if new:
        s.execute(insert(Instance), new)


def releases_held(
    s: Session,
    execution_id: str,
    stage_index: int,
    hosts: list[str],
    *,
    kind: str,
    phase: int | None = None,
) -> dict[str, list[str]]:
    """The releases each host reported holding in its last Release unit of the stage (of the
    phase ``phase`` when given: a host's rows of one dispatch all carry its phase)."""
    from app.units import RELEASES_OUTPUT

    out: dict[str, tuple[int, list[str]]] = {}
    where: list[Any] = [
        HostStepRun.execution_id == execution_id,
        HostStepRun.stage_index == stage_index,
        HostStepRun.kind == kind,
        col(HostStepRun.host).in_(hosts),
    ]
    if phase is not None:
        where.append(HostStepRun.phase == phase)
    for rid, host, outputs in s.exec(
        select(HostStepRun.id, HostStepRun.host, HostStepRun.outputs).where(*where)
    ).all():
        listed = (outputs or {}).get(RELEASES_OUTPUT)
        if listed is not None and (host not in out or (rid or 0) > out[host][0]):
            out[host] = (rid or 0, str(listed).split())
    return {h: v for h, (_, v) in out.items()}


def record_rolled_back(s: Session, ex: Execution, run: StageRun, hosts: list[str]) -> None:
    """Instance rows of hosts that are back on their earlier version."""
    if not hosts or get_settings().test_connection:
        return
    stage = deployment_stage(ex, run.stage_index)
    svc, env = stage.service.identifier, stage.environment.identifier
    targets = (run.rollback or {}).get("hosts", {})
    by_name = {h["name"]: h for h in run.hosts}
    # The whole unique key: index lookups, not a scan of every instance of the service.
    infras = sorted({by_name[n]["infrastructure"] for n in hosts if n in by_name})
    rows = {
        (i.infrastructure, i.host): i
        for i in s.exec(
            select(Instance).where(
                Instance.service == svc,
                Instance.environment == env,
                col(Instance.infrastructure).in_(infras),
                col(Instance.host).in_(hosts),
            )
        ).all()
    }
    held = releases_held(s, ex.id, run.stage_index, hosts, kind="rollback")
    for name in hosts:
        inst = rows.get((by_name[name]["infrastructure"], name))
        target = targets.get(name) or {}
        if inst is not None and name in held:
            inst.releases = held[name]
        if inst is None or not target.get("version"):
            continue
        source = target.get("source")
        inst.version = target["version"]
        inst.execution_id = source[0] if source else ex.id
        # One level of history: a second rollback has nothing to go back to.
        inst.previous_version = inst.previous_execution_id = None
        s.add(inst)
