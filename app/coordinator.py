"""The coordinator: turns pipeline files into an execution and drives it phase by phase.

``submit()`` validates, resolves and records an execution, then calls ``advance()``.
``advance()`` is the only place that decides what happens next. It is idempotent and may be
called any number of times, from the CLI, the gate, an error callback or a reconciler: it locks
the execution row (``SELECT ... FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``), reads the ledger,
records its decision (a unique PhaseRun row per dispatch), and publishes the next canvas only
after the commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from app.canvas import HostStepKey
from app.db import session_scope
from app.errors import ConfigError, SpecError
from app.models import (
    Execution,
    HostStepRun,
    Instance,
    PhaseRun,
    StageRun,
    Status,
    StepRun,
    utcnow,
)
from app.providers.base import Host, discover
from app.settings import get_settings

log = logging.getLogger("vmfarm.coordinator")


def new_execution_id() -> str:
    return uuid.uuid4().hex[:12]


def submit(
    paths: Iterable[str],
    *,
    pipeline: str | None = None,
    inputs: Mapping[str, str] | None = None,
    user: str = "",
    publish: bool = True,
) -> str:
    """Validate and record an execution, dispatch its first phase; return the execution id.

    Raises SpecError/SpecErrors (nothing is recorded) when the files or inputs are wrong.
    """
    from app.spec import choose_pipeline, load, resolve

    bundle = load(paths, inputs=dict(inputs or {}), require_inputs=True)
    pipe = choose_pipeline(bundle, pipeline)
    execution_id = new_execution_id()
    plan = resolve(bundle, pipe, execution_id=execution_id)
    # Discover static hosts now: a bad host list is bad input, refused before anything runs.
    stage_hosts: list[list[Host]] = []
    for stage in plan["stages"]:
        stage_hosts.append(_discover_stage(stage) if _all_static(stage) else [])
    with session_scope() as s:
        ex = Execution(
            id=execution_id, pipeline=plan["identifier"], pipeline_name=plan["name"],
            plan=plan, inputs={k: str(v) for k, v in (inputs or {}).items()},
            created_by=user or get_settings().user or "",
        )
        s.add(ex)
        s.flush()
        for i, stage in enumerate(plan["stages"]):
            s.add(StageRun(execution_id=execution_id, stage_index=i,
                           identifier=stage["identifier"], name=stage["name"],
                           hosts=[h.to_dict() for h in stage_hosts[i]]))
            for j, step in enumerate(stage["steps"]):
                s.add(StepRun(execution_id=execution_id, stage_index=i, step_index=j,
                              identifier=step["identifier"], name=step.get("name", "")))
    if publish:
        advance(execution_id)
    return execution_id


def _all_static(stage: dict[str, Any]) -> bool:
    return all(i["provider"] == "static" for i in stage["infrastructures"])


def _discover_stage(stage: dict[str, Any]) -> list[Host]:
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for infra in stage["infrastructures"]:
        for h in discover(infra):
            if h.name in seen:
                raise SpecError(
                    f"host {h.name} appears in infrastructures '{seen[h.name]}' and "
                    f"'{infra['identifier']}' of stage '{stage['identifier']}'",
                    file=infra.get("source", ""))
            seen[h.name] = infra["identifier"]
            hosts.append(h)
    if not hosts:
        raise SpecError(f"stage '{stage['identifier']}' targets no hosts",
                        file=stage["infrastructures"][0].get("source", "") if
                        stage["infrastructures"] else "")
    return hosts


@dataclass
class _Dispatch:
    execution_id: str
    stage_index: int
    phase: int
    hosts: list[tuple[str, str]]
    step_count: int


def _lock_execution(s: Session, execution_id: str) -> Execution | None:
    stmt = select(Execution).where(Execution.id == execution_id)
    if s.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return s.exec(stmt).first()


def advance(execution_id: str) -> str:
    """Decide and perform the next action for an execution; returns what it did."""
    dispatches: list[_Dispatch] = []
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None:
            return "missing"
        if ex.status in Status.TERMINAL:
            return "noop"
        decision = _decide(s, ex, dispatches)
    # Publish only after COMMIT: a task must never run before its rows are visible.
    for d in dispatches:
        _publish(d)
    return decision


def _decide(s: Session, ex: Execution, dispatches: list[_Dispatch]) -> str:
    stages = ex.plan["stages"]
    while True:
        if ex.current_stage >= len(stages):
            _finish(s, ex, Status.SUCCEEDED)
            return "succeeded"
        stage_plan = stages[ex.current_stage]
        run = s.exec(select(StageRun).where(StageRun.execution_id == ex.id,
                                            StageRun.stage_index == ex.current_stage)).one()
        if run.status == Status.PENDING:
            try:
                hosts = [Host.from_dict(h) for h in run.hosts] or _discover_stage(stage_plan)
            except (ConfigError, SpecError) as exc:
                run.status, run.error, run.finished_at = Status.FAILED, str(exc), utcnow()
                _finish(s, ex, Status.FAILED, error=f"stage '{run.identifier}': {exc}")
                return "failed"
            from strategies import plan as plan_phases

            phases = plan_phases(stage_plan, [h.name for h in hosts])
            run.hosts = [h.to_dict() for h in hosts]
            run.phases = [list(p.hosts) for p in phases]
            run.status, run.started_at = Status.RUNNING, utcnow()
            if ex.status == Status.QUEUED:
                ex.status, ex.started_at = Status.RUNNING, utcnow()
            s.add(ex)
            s.add(run)
        last = s.exec(
            select(PhaseRun)
            .where(PhaseRun.execution_id == ex.id, PhaseRun.stage_index == run.stage_index,
                   PhaseRun.kind == "deploy")
            .order_by(col(PhaseRun.phase).desc())
        ).first()
        if last is None:
            _dispatch(s, ex, run, 0, dispatches)
            return "dispatched phase 0"
        if last.status == Status.RUNNING and not _evaluate_phase(s, ex, run, last, gate=False):
            return "waiting"
        if last.status == Status.FAILED:
            _summarise_steps(s, ex, run)
            run.status, run.finished_at = Status.FAILED, utcnow()
            failed = (last.verdict or {}).get("failed", [])
            run.error = f"{len(failed)} host(s) failed in phase {last.phase + 1}: " + ", ".join(
                failed[:10]) + (" ..." if len(failed) > 10 else "")
            s.add(run)
            _finish(s, ex, Status.FAILED, error=f"stage '{run.identifier}': {run.error}")
            return "failed"
        if last.phase + 1 < len(run.phases):
            _dispatch(s, ex, run, last.phase + 1, dispatches)
            return f"dispatched phase {last.phase + 1}"
        _summarise_steps(s, ex, run)
        run.status, run.finished_at = Status.SUCCEEDED, utcnow()
        s.add(run)
        ex.current_stage += 1
        s.add(ex)


def _dispatch(s: Session, ex: Execution, run: StageRun, phase: int,
              out: list[_Dispatch]) -> None:
    names = run.phases[phase]
    by_name = {h["name"]: h for h in run.hosts}
    s.add(PhaseRun(execution_id=ex.id, stage_index=run.stage_index, phase=phase,
                   hosts=list(names)))
    s.flush()  # the unique (execution, stage, phase, kind) row: a second dispatch fails here
    steps = ex.plan["stages"][run.stage_index]["steps"]
    out.append(_Dispatch(ex.id, run.stage_index, phase,
                         [(n, by_name[n]["region"]) for n in names], len(steps)))


def _publish(d: _Dispatch) -> None:
    from app.canvas import phase_canvas

    canvas = phase_canvas(execution_id=d.execution_id, stage_index=d.stage_index, phase=d.phase,
                          hosts=d.hosts, step_count=d.step_count,
                          expires=get_settings().dispatch_expires)
    canvas.apply_async()
    log.info("execution %s: published stage %d phase %d (%d hosts)", d.execution_id,
             d.stage_index, d.phase, len(d.hosts))


def gate(execution_id: str, stage_index: int, phase: int) -> str:
    """The chord body: record the phase's verdict from the ledger, then advance."""
    with session_scope() as s:
        ex = _lock_execution(s, execution_id)
        if ex is None or ex.status in Status.TERMINAL:
            return "noop"
        pr = s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == execution_id, PhaseRun.stage_index == stage_index,
            PhaseRun.phase == phase, PhaseRun.kind == "deploy")).first()
        run = s.exec(select(StageRun).where(StageRun.execution_id == execution_id,
                                            StageRun.stage_index == stage_index)).one()
        if pr is not None and pr.status == Status.RUNNING:
            _evaluate_phase(s, ex, run, pr, gate=True)
    return advance(execution_id)


def record_lost_step(key: HostStepKey, *, error_class: str, error: str) -> None:
    """A step task failed before it could record its outcome: record it as failed.

    Creates the row when the task never claimed it (expired, revoked); leaves a finished row
    alone (the task did record its outcome and failed later).
    """
    from sqlalchemy.exc import IntegrityError

    with session_scope() as s:
        row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).first()
        if row is not None and row.status in Status.TERMINAL:
            return
        if row is None:
            stage = s.get(Execution, key.execution)
            step_id = stage.plan["stages"][key.stage]["steps"][key.step]["identifier"] \
                if stage else ""
            row = HostStepRun(idem_key=key.idem, execution_id=key.execution,
                              stage_index=key.stage, phase=key.phase, step_index=key.step,
                              step_id=step_id, host=key.host, region=key.region,
                              attempt=key.attempt)
        row.status, row.error_class, row.error = Status.FAILED, error_class, error
        row.finished_at = utcnow()
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:  # the task claimed it meanwhile: its own outcome wins
            pass


def _evaluate_phase(s: Session, ex: Execution, run: StageRun, pr: PhaseRun, *,
                    gate: bool) -> bool:
    """Write the phase verdict when every host of it is done; False while any still runs.

    Called by the gate (every header task has finished) or by a nudge (maybe not). A host is
    done when each step has a finished row, or a step failed (later steps are skipped); with the
    gate, a missing row means its task never ran, which counts as failed.
    """
    n_steps = len(ex.plan["stages"][run.stage_index]["steps"])
    rows = s.exec(select(HostStepRun).where(
        HostStepRun.execution_id == ex.id, HostStepRun.stage_index == run.stage_index,
        HostStepRun.phase == pr.phase)).all()
    by_host: dict[str, dict[int, HostStepRun]] = {}
    for r in rows:
        cur = by_host.setdefault(r.host, {}).get(r.step_index)
        if cur is None or r.attempt > cur.attempt:
            by_host[r.host][r.step_index] = r
    failed: list[str] = []
    per_host: dict[str, dict[str, Any]] = {}
    for host in pr.hosts:
        steps = by_host.get(host, {})
        running = any(r.status == Status.RUNNING for r in steps.values())
        has_failed = any(r.status == Status.FAILED for r in steps.values())
        complete = len(steps) == n_steps and all(r.status in Status.TERMINAL
                                                 for r in steps.values())
        if (running or not (complete or has_failed or gate)) and not gate:
            return False
        ok = complete and not has_failed and all(r.status == Status.SUCCEEDED
                                                 for r in steps.values())
        if not ok:
            failed.append(host)
            bad = next((r for r in sorted(steps.values(), key=lambda r: r.step_index)
                        if r.status != Status.SUCCEEDED), None)
            per_host[host] = {
                "step": bad.step_id if bad else None,
                "unit": bad.failed_unit if bad else None,
                "exit_code": bad.exit_code if bad else None,
                "error_class": (bad.error_class if bad else None) or "Unknown",
                "error": (bad.error if bad else None) or "the host's tasks never ran",
            }
    pr.verdict = {
        "passed": not failed,
        "hosts": len(pr.hosts),
        "succeeded": len(pr.hosts) - len(failed),
        "failed": failed,
        "failures": per_host,
        "rule": "every host succeeds (failure budget 0)",
    }
    pr.status = Status.FAILED if failed else Status.SUCCEEDED
    pr.gate_at = utcnow()
    s.add(pr)
    _record_instances(s, ex, run, [h for h in pr.hosts if h not in failed])
    return True


def _record_instances(s: Session, ex: Execution, run: StageRun, hosts: list[str]) -> None:
    """Update the per-host ledger: which version now runs where."""
    if not hosts:
        return
    stage = ex.plan["stages"][run.stage_index]
    version = (stage.get("artifact") or {}).get("tag")
    by_name = {h["name"]: h for h in run.hosts}
    svc, env = stage["service"]["identifier"], stage["environment"]["identifier"]
    existing = {
        (i.infrastructure, i.host): i
        for i in s.exec(select(Instance).where(Instance.service == svc,
                                               Instance.environment == env,
                                               col(Instance.host).in_(hosts))).all()
    }
    for name in hosts:
        h = by_name[name]
        inst = existing.get((h["infrastructure"], name))
        if inst is None:
            inst = Instance(service=svc, environment=env, infrastructure=h["infrastructure"],
                            host=name, region=h["region"], execution_id=ex.id)
        elif inst.version != version:
            inst.previous_version = inst.version
        inst.version, inst.execution_id, inst.updated_at = version, ex.id, utcnow()
        inst.region = h["region"]
        s.add(inst)


def _summarise_steps(s: Session, ex: Execution, run: StageRun) -> None:
    rows = s.exec(select(HostStepRun).where(HostStepRun.execution_id == ex.id,
                                            HostStepRun.stage_index == run.stage_index)).all()
    steps = s.exec(select(StepRun).where(StepRun.execution_id == ex.id,
                                         StepRun.stage_index == run.stage_index)).all()
    for st in steps:
        mine = [r for r in rows if r.step_index == st.step_index]
        st.succeeded = sum(r.status == Status.SUCCEEDED for r in mine)
        st.failed = sum(r.status == Status.FAILED for r in mine)
        st.skipped = sum(r.status == Status.SKIPPED for r in mine)
        st.started_at = min((r.started_at for r in mine), default=None)
        st.finished_at = max((r.finished_at for r in mine if r.finished_at), default=None)
        st.status = (Status.FAILED if st.failed else Status.SUCCEEDED if st.succeeded
                     else Status.SKIPPED)
        s.add(st)


def _finish(s: Session, ex: Execution, status: str, *, error: str | None = None) -> None:
    ex.status, ex.finished_at = status, utcnow()
    if error:
        ex.error = error
    for run in s.exec(select(StageRun).where(StageRun.execution_id == ex.id,
                                             StageRun.status == Status.PENDING)).all():
        run.status = Status.SKIPPED
        s.add(run)
    s.add(ex)
