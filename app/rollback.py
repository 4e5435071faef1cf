"""Rollback plans, computed from the ledger (never from what a callback happened to see).

A stage rolls back the hosts it *changed*: a host changed when one of its deploy steps ran
(succeeded, was ignored, was aborted between units, failed inside a unit, or lost its worker).
A host whose steps never started, or that failed to connect or authenticate, was not touched and
is left alone. Phases roll back in reverse order, each as its own canvas.

Per host the plan names the version it returns to:

- with ``rollbackSteps``, those steps run on every changed host, with ``<+rollbackArtifact.tag>``
  set to the version below (empty when there is none);
- without them, the built-in rollback re-runs the steps of the execution that deployed the
  previous version (from the Instance ledger), so that version's artifact and scripts come back.
  A host with no earlier version recorded (a first deployment) is left as it is, and the plan
  says so.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from app.models import Execution, HostStepRun, Instance, PhaseRun, StageRun, Status

# A failed step with one of these error classes and no unit recorded never touched the host.
_UNTOUCHED_CLASSES = {"Connectivity", "Authentication"}


def _touched(row: HostStepRun) -> bool:
    if row.status in (Status.SUCCEEDED, Status.IGNORED, Status.ABORTED):
        return True
    if row.status != Status.FAILED:
        return False  # RUNNING rows are waited for; SKIPPED rows did nothing
    error = row.error or ""
    if error.startswith(("expired", "skipped")) or "nothing ran" in error:
        return False
    return not (row.error_class in _UNTOUCHED_CLASSES and row.exit_code is None)


def changed_hosts(s: Session, execution_id: str, stage_index: int) -> set[str]:
    """Hosts on which a deploy step of the stage ran (see the module docstring)."""
    rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == execution_id,
                                            HostStepRun.stage_index == stage_index,
                                            HostStepRun.kind == "deploy")).all()
    return {r.host for r in rows if _touched(r)}


def _source_stage(plan: dict[str, Any], service: str, environment: str) -> int | None:
    for i, st in enumerate(plan["stages"]):
        if st.get("type") == "Approval":
            continue
        if (st["service"]["identifier"], st["environment"]["identifier"]) == (service,
                                                                              environment):
            return i
    return None


def rollback_target(s: Session, stage: dict[str, Any], host: dict[str, Any],
                    deployed_by: str) -> dict[str, Any]:
    """What ``host`` returns to: {"version", "source": [execution, stage] | None, "steps",
    "reason"} where ``reason`` says why there is no source."""
    svc, env = stage["service"]["identifier"], stage["environment"]["identifier"]
    inst = s.exec(select(Instance).where(
        Instance.service == svc, Instance.environment == env,
        Instance.infrastructure == host["infrastructure"],
        Instance.host == host["name"])).first()
    if inst is None:
        return {"version": None, "source": None, "steps": 0,
                "reason": "no earlier version recorded (first deployment on this host)"}
    if inst.execution_id == deployed_by:
        version, source_id = inst.previous_version, inst.previous_execution_id
    else:  # this execution never finished on the host: it still has what was there
        version, source_id = inst.version, inst.execution_id
    if not version or not source_id:
        return {"version": version, "source": None, "steps": 0,
                "reason": "no earlier version recorded (first deployment on this host)"}
    source = s.get(Execution, source_id)
    index = _source_stage(source.plan, svc, env) if source else None
    if source is None or index is None:
        return {"version": version, "source": None, "steps": 0,
                "reason": f"the execution {source_id} that deployed {version} is no longer in "
                          "the ledger"}
    return {"version": version, "source": [source_id, index],
            "steps": len(source.plan["stages"][index]["steps"]), "reason": None}


def plan_stage_rollback(s: Session, ex: Execution, run: StageRun) -> dict[str, Any]:
    """The stage's rollback plan: {"mode", "phases": [...reverse order...], "hosts": {...}}."""
    stage = ex.plan["stages"][run.stage_index]
    ledger = (ex.rollback or {}).get("of") or ex.id  # `vmfarm rollback` reads the original run
    changed = changed_hosts(s, ledger, run.stage_index) & {h["name"] for h in run.hosts}
    custom = stage.get("rollbackSteps") or []
    by_name = {h["name"]: h for h in run.hosts}
    hosts: dict[str, dict[str, Any]] = {}
    phases: list[dict[str, Any]] = []
    standby: dict[str, str] = {}
    switch = s.exec(select(PhaseRun).where(
        PhaseRun.execution_id == ledger, PhaseRun.stage_index == run.stage_index,
        PhaseRun.kind == "switch", PhaseRun.status == Status.SUCCEEDED)).first()
    if switch is not None:
        # Blue-green moved traffic: traffic goes back first, to the set that had it before;
        # the switched set then stands by with its version (a later deployment replaces it).
        switched = set(switch.hosts)
        before = [h["name"] for h in run.hosts if h["name"] not in switched]
        had_traffic = bool((switch.verdict or {}).get("before"))
        phases.append({"index": switch.phase, "kind": "switch",
                       "name": f"switch traffic back to {', '.join(before)}",
                       "hosts": before if had_traffic else [],
                       "skipped": {} if had_traffic else
                       {h: "no set had traffic before this deployment" for h in before}})
        if had_traffic:
            standby = {h: f"standby again once traffic is back on {', '.join(before)}"
                       for h in switch.hosts}
    for ph in reversed(run.phases):
        if ph.get("kind", "deploy") != "deploy":
            continue
        names = [h for h in ph["hosts"] if h in changed and h in by_name]
        run_on, skipped = [], {}
        for name in names:
            if name in standby:
                skipped[name] = standby[name]
                hosts[name] = {"version": None, "source": None, "steps": 0,
                               "reason": standby[name]}
                continue
            target = rollback_target(s, stage, by_name[name], ledger)
            if custom:  # the stage's own rollbackSteps run, whatever the version
                target = {**target, "steps": len(custom), "reason": None}
            hosts[name] = target
            if target["steps"]:
                run_on.append(name)
            else:
                skipped[name] = target["reason"]
        phases.append({"index": ph["index"], "name": f"rollback of {ph['name']}",
                       "hosts": run_on, "skipped": skipped})
    untouched = sorted({h["name"] for h in run.hosts} - changed)
    return {"mode": "rollbackSteps" if custom else "previous version", "phases": phases,
            "hosts": hosts, "untouched": untouched}


def record_rolled_back(s: Session, ex: Execution, run: StageRun, hosts: list[str]) -> None:
    """Instance rows of hosts that are back on their earlier version."""
    if not hosts:
        return
    stage = ex.plan["stages"][run.stage_index]
    svc, env = stage["service"]["identifier"], stage["environment"]["identifier"]
    targets = (run.rollback or {}).get("hosts", {})
    by_name = {h["name"]: h for h in run.hosts}
    # The whole unique key: index lookups, not a scan of every instance of the service.
    infras = sorted({by_name[n]["infrastructure"] for n in hosts if n in by_name})
    rows = {(i.infrastructure, i.host): i for i in s.exec(select(Instance).where(
        Instance.service == svc, Instance.environment == env,
        col(Instance.infrastructure).in_(infras), col(Instance.host).in_(hosts))).all()}
    from app.coordinator import releases_held

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
