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

The rollback itself runs phase by phase like a deployment: ``begin_rollback`` marks the
stage, ``decide_rollback`` dispatches each rollback phase once and ends the execution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, select

from app.coordinator.ledger import (
    deferred,
    deployment_stage,
    end_failed,
    finish,
    plan_of,
    stage_of,
    stage_run,
    summarise_steps,
)
from app.coordinator.publish import Dispatch
from app.coordinator.routing import tags_of
from app.coordinator.verdicts import evaluate_phase
from app.db import session_scope
from app.definitions.plan import DeploymentStagePlan, Plan
from app.models import (
    Execution,
    HostStepRun,
    Instance,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)

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
    """Hosts on which a deploy step of the stage ran (see the module docstring). A Wait or
    approval step touches no host, whatever its outcome."""
    rows = s.exec(
        select(HostStepRun).where(
            HostStepRun.execution_id == execution_id,
            HostStepRun.stage_index == stage_index,
            HostStepRun.kind == "deploy",
        )
    ).all()
    ex = s.get(Execution, execution_id) if rows else None
    steps = stage_of(ex, stage_index).steps if ex is not None else []
    barriers = {i for i, st in enumerate(steps) if st.type in ("Wait", "HarnessApproval")}
    return {r.host for r in rows if r.step_index not in barriers and _touched(r)}


def _source_stage(plan: Plan, service: str, environment: str) -> int | None:
    for i, st in enumerate(plan.stages):
        if isinstance(st, DeploymentStagePlan) and (
            st.service.identifier,
            st.environment.identifier,
        ) == (service, environment):
            return i
    return None


def rollback_target(
    s: Session, stage: DeploymentStagePlan, host: dict[str, Any], deployed_by: str
) -> dict[str, Any]:
    """What ``host`` returns to: {"version", "source": [execution, stage] | None, "steps",
    "reason"} where ``reason`` says why there is no source."""
    svc, env = stage.service.identifier, stage.environment.identifier
    inst = s.exec(
        select(Instance).where(
            Instance.service == svc,
            Instance.environment == env,
            Instance.infrastructure == host["infrastructure"],
            Instance.host == host["name"],
        )
    ).first()
    if inst is None:
        return {
            "version": None,
            "source": None,
            "steps": 0,
            "reason": "no earlier version recorded (first deployment on this host)",
        }
    if inst.execution_id == deployed_by:
        version, source_id = inst.previous_version, inst.previous_execution_id
    else:  # this execution never finished on the host: it still has what was there
        version, source_id = inst.version, inst.execution_id
    if not version or not source_id:
        return {
            "version": version,
            "source": None,
            "steps": 0,
            "reason": "no earlier version recorded (first deployment on this host)",
        }
    source = s.get(Execution, source_id)
    index = _source_stage(plan_of(source), svc, env) if source else None
    if source is None or index is None:
        return {
            "version": version,
            "source": None,
            "steps": 0,
            "reason": f"the execution {source_id} that deployed {version} is no longer in "
            "the ledger",
        }
    return {
        "version": version,
        "source": [source_id, index],
        "steps": len(plan_of(source).stages[index].steps),
        "reason": None,
    }


def plan_stage_rollback(s: Session, ex: Execution, run: StageRun) -> dict[str, Any]:
    """The stage's rollback plan: {"mode", "phases": [...reverse order...], "hosts": {...}}."""
    stage = deployment_stage(ex, run.stage_index)
    ledger = (ex.rollback or {}).get("of") or ex.id  # `vmfarm rollback` reads the original run
    changed = changed_hosts(s, ledger, run.stage_index) & {h["name"] for h in run.hosts}
    custom = stage.rollback_steps
    by_name = {h["name"]: h for h in run.hosts}
    hosts: dict[str, dict[str, Any]] = {}
    phases: list[dict[str, Any]] = []
    standby: dict[str, str] = {}
    switch = s.exec(
        select(PhaseRun).where(
            PhaseRun.execution_id == ledger,
            PhaseRun.stage_index == run.stage_index,
            PhaseRun.kind == "switch",
            PhaseRun.status == Status.SUCCEEDED,
        )
    ).first()
    if switch is not None:
        # Blue-green moved traffic: traffic goes back first, to the set that had it before;
        # the switched set then stands by with its version (a later deployment replaces it).
        switched = set(switch.hosts)
        before = [h["name"] for h in run.hosts if h["name"] not in switched]
        had_traffic = bool((switch.verdict or {}).get("before"))
        phases.append(
            {
                "index": switch.phase,
                "kind": "switch",
                "name": f"switch traffic back to {', '.join(before)}",
                "hosts": before if had_traffic else [],
                "skipped": {}
                if had_traffic
                else {h: "no set had traffic before this deployment" for h in before},
            }
        )
        if had_traffic:
            standby = {
                h: f"standby again once traffic is back on {', '.join(before)}"
                for h in switch.hosts
            }
    for ph in reversed(run.phases):
        if ph.get("kind", "deploy") != "deploy":
            continue
        names = [h for h in ph["hosts"] if h in changed and h in by_name]
        run_on, skipped = [], {}
        for name in names:
            if name in standby:
                skipped[name] = standby[name]
                hosts[name] = {"version": None, "source": None, "steps": 0, "reason": standby[name]}
                continue
            target = rollback_target(s, stage, by_name[name], ledger)
            if custom:  # the stage's own rollbackSteps run, whatever the version
                target = {**target, "steps": len(custom), "reason": None}
            hosts[name] = target
            if target["steps"]:
                run_on.append(name)
            else:
                skipped[name] = target["reason"]
        phases.append(
            {
                "index": ph["index"],
                "name": f"rollback of {ph['name']}",
                "hosts": run_on,
                "skipped": skipped,
            }
        )
    untouched = sorted({h["name"] for h in run.hosts} - changed)
    return {
        "mode": "rollbackSteps" if custom else "previous version",
        "phases": phases,
        "hosts": hosts,
        "untouched": untouched,
    }


def begin_rollback(
    s: Session,
    ex: Execution,
    run: StageRun,
    error: str,
    *,
    scope: str,
    cause: str,
    dispatches: list[Dispatch],
    together: Sequence[StageRun] = (),
) -> str:
    """Mark the stage failed (or aborted) and start rolling back: this stage, or with
    PipelineRollback every deployment stage so far, latest first. ``together``: the other
    iterations of a looped stage in flight with it (an abort), marked like it and rolled back
    after it (one already rolling back its own failure goes on)."""
    stages = [run.stage_index]
    for other in together:
        stages.append(other.stage_index)
        if other.status != Status.ROLLING_BACK:
            summarise_steps(s, ex, other)
            other.status = Status.ABORTED if cause == "aborted" else Status.FAILED
            other.error, other.finished_at = error, utcnow()
            s.add(other)
    if scope == "PipelineRollback":
        for i in range(run.stage_index - 1, -1, -1):
            if stage_of(ex, i).type in ("Approval", "Custom"):  # nothing deployed there
                continue
            earlier = s.exec(
                select(StageRun).where(StageRun.execution_id == ex.id, StageRun.stage_index == i)
            ).one()
            if earlier.status in (Status.SUCCEEDED, Status.FAILED):
                stages.append(i)
    if stage_of(ex, run.stage_index).type in ("Approval", "Custom"):
        stages.remove(run.stage_index)
    summarise_steps(s, ex, run)
    run.status = Status.ABORTED if cause == "aborted" else Status.FAILED
    run.error, run.finished_at = error, utcnow()
    s.add(run)
    ex.rollback = {"cause": cause, "scope": scope, "stages": stages, "error": error}
    ex.status = Status.ROLLING_BACK
    ex.error = f"stage '{run.identifier}': {error}"
    s.add(ex)
    return decide_rollback(s, ex, dispatches)


def begin_iteration_rollback(
    s: Session, ex: Execution, run: StageRun, error: str, dispatches: list[Dispatch]
) -> str:
    """One iteration of a looped stage whose iterations run side by side failed: it rolls
    back on its own (the execution goes on RUNNING, its other iterations in flight finish);
    app.coordinator.machine carries its rollback on and ends the group once every iteration
    ended."""
    summarise_steps(s, ex, run)
    run.status, run.error, run.finished_at = Status.ROLLING_BACK, error, utcnow()
    s.add(run)
    said = roll_back_stage(s, ex, run, dispatches)
    return f"stage '{run.identifier}': " + (said or "rolled back")


def rolled_back_count(s: Session, ex: Execution, stage_index: int | None = None) -> int:
    """How many hosts the execution (or one of its stages) rolled back."""
    where = [
        PhaseRun.execution_id == ex.id,
        PhaseRun.kind == "rollback",
        PhaseRun.status == Status.SUCCEEDED,
    ]
    if stage_index is not None:
        where.append(PhaseRun.stage_index == stage_index)
    return sum(len(r.hosts) for r in s.exec(select(PhaseRun).where(*where)).all())


def decide_rollback(s: Session, ex: Execution, dispatches: list[Dispatch]) -> str:
    """Roll back the stages named in ``ex.rollback``, each phase as its own canvas, once."""
    info = ex.rollback or {}
    for si in info.get("stages", []):
        said = roll_back_stage(s, ex, stage_run(s, ex, si), dispatches)
        if said:
            return said
    runs = s.exec(
        select(StageRun).where(
            StageRun.execution_id == ex.id, col(StageRun.stage_index).in_(info.get("stages", []))
        )
    ).all()
    if any(r.status == Status.ROLLBACK_FAILED for r in runs):
        finish(
            s,
            ex,
            Status.ROLLBACK_FAILED,
            error=f"{ex.error or info.get('error')}; the rollback failed on some hosts",
        )
        return "rollback failed"
    final = {"aborted": Status.ABORTED, "requested": Status.SUCCEEDED}.get(
        info.get("cause", ""), Status.FAILED
    )
    done = rolled_back_count(s, ex)
    note = (
        ""
        if info.get("cause") == "requested"
        else (
            f"; rolled back {done} host(s)"
            if done
            else "; nothing was rolled back (no host had an earlier version recorded)"
        )
    )
    error = f"{ex.error or info.get('error')}{note}"
    if final == Status.FAILED and info.get("scope") == "StageRollback":
        return end_failed(s, ex, error) or "rolled back"  # later stages may run after it
    finish(s, ex, final, error=error if final != Status.SUCCEEDED else None)
    return "rolled back"


def roll_back_stage(
    s: Session, ex: Execution, run: StageRun, dispatches: list[Dispatch]
) -> str | None:
    """Roll back one stage (or one iteration of a looped stage), each phase as its own canvas,
    once: what is under way while it rolls back, None once it ended (ROLLED_BACK, or
    ROLLBACK_FAILED when a phase failed)."""
    if run.status in (Status.ROLLED_BACK, Status.ROLLBACK_FAILED):
        return None
    if run.rollback is None:
        running = s.exec(
            select(HostStepRun).where(
                HostStepRun.execution_id == ex.id,
                HostStepRun.stage_index == run.stage_index,
                HostStepRun.kind == "deploy",
                HostStepRun.status == Status.RUNNING,
            )
        ).all()
        if running:  # an abort: hosts stop at their next unit, then roll back
            return f"rolling back: waiting for {len(running)} running step(s) to stop"
        run.rollback = plan_stage_rollback(s, ex, run)
        run.status = Status.ROLLING_BACK
        s.add(run)
    # Host lists are read only for the phase being judged (a deferred column).
    records = _phase_runs(s, ex, run, "rollback")
    switches = _phase_runs(s, ex, run, "rollback-switch")
    for ph in run.rollback["phases"]:
        if not ph["hosts"]:
            continue
        if ph.get("kind") == "switch":  # traffic first (blue-green)
            rec = switches.get(ph["index"])
            if rec is None:
                s.add(
                    PhaseRun(
                        execution_id=ex.id,
                        stage_index=run.stage_index,
                        phase=ph["index"],
                        kind="rollback-switch",
                        hosts=list(ph["hosts"]),
                    )
                )
                s.flush()
                dispatches.append(
                    Dispatch("rollback-switch", ex.id, run.stage_index, ph["index"], [])
                )
                return f"dispatched {ph['name']}"
            if rec.status == Status.RUNNING:
                return "rolling back"
            continue
        rec = records.get(ph["index"])
        if rec is None:
            _dispatch_rollback(s, ex, run, ph, dispatches)
            return f"dispatched {ph['name']}"
        if rec.status == Status.RUNNING and not evaluate_phase(s, ex, run, rec, gate=False):
            return "rolling back"
    failed = [r for r in [*records.values(), *switches.values()] if r.status == Status.FAILED]
    run.status = Status.ROLLBACK_FAILED if failed else Status.ROLLED_BACK
    run.finished_at = utcnow()
    s.add(run)
    return None


def _phase_runs(s: Session, ex: Execution, run: StageRun, kind: str) -> dict[int, PhaseRun]:
    """The stage's phase records of one kind, by phase index (host lists deferred)."""
    return {
        p.phase: p
        for p in s.exec(
            select(PhaseRun)
            .where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == run.stage_index,
                PhaseRun.kind == kind,
            )
            .options(*deferred(PhaseRun.hosts))
        ).all()
    }


def _dispatch_rollback(
    s: Session, ex: Execution, run: StageRun, ph: dict[str, Any], out: list[Dispatch]
) -> None:
    by_name = {h["name"]: h for h in run.hosts}
    s.add(
        PhaseRun(
            execution_id=ex.id,
            stage_index=run.stage_index,
            phase=ph["index"],
            kind="rollback",
            hosts=list(ph["hosts"]),
            verdict={"skipped": ph.get("skipped", {})},
        )
    )
    s.flush()  # unique (execution, stage, phase, "rollback"): dispatched exactly once
    targets = run.rollback["hosts"] if run.rollback else {}
    builtin = (run.rollback or {}).get("mode") != "rollbackSteps"
    steps_of: dict[str, tuple[int, tuple[str, int] | None]] = {}
    for name in ph["hosts"]:
        t = targets[name]
        src = t.get("source") if builtin else None
        steps_of[name] = (int(t["steps"]), (str(src[0]), int(src[1])) if src else None)
    stage = deployment_stage(ex, run.stage_index)
    out.append(
        Dispatch(
            "rollback",
            ex.id,
            run.stage_index,
            ph["index"],
            [(n, by_name[n]["region"]) for n in ph["hosts"]],
            lanes=stage.strategy.max_concurrency,
            steps_of=steps_of,
            tags_of=tags_of(
                stage, [by_name[n] for n in ph["hosts"]], stage.rollback_steps or stage.steps
            ),
        )
    )


def _child_rolled_back_first(s: Session, ex: Execution, run: StageRun) -> None:
    """A Pipeline stage's child deployed on its own account: ``vmfarm rollback`` of the parent
    does not reach into it, so the child is rolled back first (LookupError otherwise)."""
    child = s.exec(
        select(Execution)
        .where(
            Execution.parent_execution_id == ex.id,
            Execution.parent_stage == run.stage_index,
        )
        .order_by(col(Execution.created_at).desc())
    ).first()
    if child is not None and child.status == Status.SUCCEEDED and _rolled_back_by(s, child) is None:
        raise LookupError(
            f"stage '{run.identifier}' of execution {ex.id} ran pipeline {child.pipeline} as "
            f"execution {child.id}: roll that one back first (vmfarm rollback {child.id}), "
            f"then {ex.id}"
        )


def rollback_plan(execution_id: str) -> dict[str, Any]:
    """What ``vmfarm rollback`` would do for a finished execution, per stage and host (the
    plan the rollback execution itself computes)."""
    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        of = (
            (ex.rollback or {}).get("of")
            if (ex.rollback or {}).get("cause") == "requested"
            else None
        )
        if of:
            raise LookupError(
                f"execution {execution_id} is a rollback (of {of}): a rollback is "
                f"not rolled back; to deploy what {of} deployed again, run its "
                "pipeline again"
            )
        if ex.status != Status.SUCCEEDED:
            raise LookupError(
                f"execution {execution_id} is {ex.status}: only a successful "
                "execution is rolled back with `vmfarm rollback` (a failed one "
                "rolls back by its failure strategy)"
            )
        undone = _rolled_back_by(s, ex)
        if undone is not None:
            raise LookupError(
                f"execution {execution_id} was rolled back already by execution "
                f"{undone.id} ({undone.status}); its hosts run what they ran "
                "before it (vmfarm artifacts SERVICE)"
            )
        probe = Execution(
            id="<rollback-plan>", pipeline=ex.pipeline, plan=ex.plan, rollback={"of": execution_id}
        )
        stages: list[dict[str, Any]] = []
        for run in s.exec(
            select(StageRun)
            .where(StageRun.execution_id == execution_id)
            .order_by(col(StageRun.stage_index).desc())
        ).all():
            stage = stage_of(ex, run.stage_index)
            if stage.type == "Pipeline" and run.status == Status.SUCCEEDED:
                _child_rolled_back_first(s, ex, run)
            if (
                not isinstance(stage, DeploymentStagePlan)
                or stage.type == "Custom"
                or run.status != Status.SUCCEEDED
            ):
                continue
            by_name = {h["name"]: h for h in run.hosts}
            for name in changed_hosts(s, execution_id, run.stage_index) & set(by_name):
                inst = s.exec(
                    select(Instance).where(
                        Instance.service == stage.service.identifier,
                        Instance.environment == stage.environment.identifier,
                        Instance.infrastructure == by_name[name]["infrastructure"],
                        Instance.host == name,
                    )
                ).first()
                if inst is not None and inst.execution_id != execution_id:
                    now = s.get(Execution, inst.execution_id)
                    if now is not None and now.created_at > ex.created_at:
                        raise LookupError(
                            f"host {name} now runs {inst.version} from execution "
                            f"{inst.execution_id}, deployed after {execution_id}: roll that "
                            "one back first"
                        )
                    raise LookupError(
                        f"host {name} no longer runs what execution {execution_id} deployed: "
                        f"it runs {inst.version} again, from the older execution "
                        f"{inst.execution_id}"
                    )
            plan = plan_stage_rollback(s, probe, run)
            current = {
                i.host: i.version
                for i in s.exec(
                    select(Instance).where(
                        Instance.service == stage.service.identifier,
                        Instance.environment == stage.environment.identifier,
                        col(Instance.host).in_(list(by_name)),
                    )
                ).all()
            }
            skipped = {h: why for ph in plan["phases"] for h, why in ph["skipped"].items()}
            hosts = []
            for name, t in plan["hosts"].items():
                how = None
                if name not in skipped:
                    how = (
                        "rollbackSteps"
                        if plan["mode"] == "rollbackSteps"
                        else f"re-run the steps of execution {t['source'][0]}"
                    )
                hosts.append(
                    {
                        "host": name,
                        "region": by_name[name]["region"],
                        "from": current.get(name),
                        "to": t.get("version"),
                        "how": how,
                        "skipped": skipped.get(name),
                    }
                )
            stages.append(
                {
                    "stage": stage.identifier,
                    "service": stage.service.identifier,
                    "environment": stage.environment.identifier,
                    "phases_in_order": [
                        {"phase": ph["name"], "hosts": ph["hosts"]} for ph in plan["phases"]
                    ],
                    "hosts": hosts,
                }
            )
    if not any(ph["hosts"] for st in stages for ph in st["phases_in_order"]):
        reasons: dict[str, int] = {}
        for st in stages:
            for h in st["hosts"]:
                why_not = str(h["skipped"] or "nothing to do")
                reasons[why_not] = reasons.get(why_not, 0) + 1
        why = (
            "; ".join(f"{n} host(s): {r}" for r, n in sorted(reasons.items()))
            or "it changed no host"
        )
        raise LookupError(f"execution {execution_id} has no host to roll back ({why})")
    return {"execution": execution_id, "pipeline": ex.pipeline, "stages": stages}


def _rolled_back_by(s: Session, ex: Execution) -> Execution | None:
    """The `vmfarm rollback` of ``ex`` that ran or runs (the newest), if any."""
    later = s.exec(
        select(Execution)
        .where(
            Execution.pipeline == ex.pipeline,
            col(Execution.created_at) >= ex.created_at,
            Execution.id != ex.id,
        )
        .order_by(col(Execution.created_at).desc())
    ).all()
    return next(
        (
            e
            for e in later
            if (e.rollback or {}).get("cause") == "requested"
            and (e.rollback or {}).get("of") == ex.id
        ),
        None,
    )
