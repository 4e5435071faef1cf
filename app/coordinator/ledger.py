"""The ledger as the coordinator reads and writes it: the locked execution row, stage rows
with their (immutable) hosts and phases read once per process, and the writes that end
a stage or an execution.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import defer
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from app.canvas import HostStepKey
from app.db import session_scope
from app.definitions.plan import AnyStagePlan, DeploymentStagePlan, Plan
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
    StepRun,
    utcnow,
)

log = logging.getLogger("vmfarm.coordinator")


def new_execution_id() -> str:
    return uuid.uuid4().hex[:12]


_MEMO_SIZE = 16


_memo_lock = threading.Lock()


_plans: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()


_stages: OrderedDict[tuple[Any, ...], _StageData] = OrderedDict()


_typed: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()


def plan_of(ex: Execution) -> Plan:
    """The execution's plan, typed (decoded once per process: it never changes)."""
    key = (ex.id, ex.created_at, id(ex.plan))
    plan: Plan | None = _memo_get(_typed, key)
    if plan is None:
        plan = Plan.of(ex.plan)
        _memo_put(_typed, key, plan)
    return plan


def stage_of(ex: Execution, index: int) -> AnyStagePlan:
    """Stage ``index`` of the execution's plan."""
    return plan_of(ex).stages[index]


def deployment_stage(ex: Execution, index: int) -> DeploymentStagePlan:
    """Stage ``index``, which is a Deployment stage (the caller knows it)."""
    stage = stage_of(ex, index)
    assert isinstance(stage, DeploymentStagePlan), f"stage {index} is {stage.type}"
    return stage


@dataclass
class _StageData:
    """A started stage's hosts and phases as stored, and what the coordinator derives."""

    hosts: list[dict[str, Any]]
    phases: list[dict[str, Any]]
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Position in ``phases`` of the phase with each index.
    position: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, run: StageRun) -> _StageData:
        return cls(
            run.hosts,
            run.phases,
            {h["name"]: h for h in run.hosts},
            {int(ph["index"]): i for i, ph in enumerate(run.phases)},
        )


def _memo_get(memo: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...]) -> Any:
    with _memo_lock:
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
        return hit


def _memo_put(memo: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    with _memo_lock:
        memo[key] = value
        memo.move_to_end(key)
        while len(memo) > _MEMO_SIZE:
            memo.popitem(last=False)


def deferred(*attrs: Any) -> list[Any]:
    """Load options: these (large) columns are read only when used."""
    return [defer(a) for a in attrs]


def _db_key(s: Session) -> str:
    return str(s.get_bind().engine.url)


def lock_execution(s: Session, execution_id: str) -> Execution | None:
    """The execution row, locked; its plan from this process's memory after the first read."""
    stmt = select(Execution).where(Execution.id == execution_id).options(*deferred(Execution.plan))
    if s.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    ex = s.exec(stmt).first()
    if ex is not None and "plan" in sa_inspect(ex).unloaded:
        key = (_db_key(s), ex.id, ex.created_at)
        plan = _memo_get(_plans, key)
        if plan is None:
            plan = s.exec(select(Execution.plan).where(Execution.id == ex.id)).one()
            _memo_put(_plans, key, plan)
        set_committed_value(ex, "plan", plan)
    return ex


def stage_run(s: Session, ex: Execution, stage_index: int) -> StageRun:
    """A stage's row; once the stage has started, its hosts and phases come from memory."""
    key = (_db_key(s), ex.id, ex.created_at, stage_index)
    data: _StageData | None = _memo_get(_stages, key)
    where = (StageRun.execution_id == ex.id, StageRun.stage_index == stage_index)
    if data is None:
        run = s.exec(select(StageRun).where(*where)).one()
        if run.status != Status.PENDING and run.phases:
            _memo_put(_stages, key, _StageData.of(run))
        return run
    run = s.exec(
        select(StageRun).where(*where).options(*deferred(StageRun.hosts, StageRun.phases))
    ).one()
    unloaded = sa_inspect(run).unloaded
    if "hosts" in unloaded:
        set_committed_value(run, "hosts", data.hosts)
    if "phases" in unloaded:
        set_committed_value(run, "phases", data.phases)
    return run


def stage_data(s: Session, ex: Execution, run: StageRun) -> _StageData:
    """The derived maps of a stage (from memory when it was read back started)."""
    data: _StageData | None = _memo_get(
        _stages, (_db_key(s), ex.id, ex.created_at, run.stage_index)
    )
    if data is not None and data.hosts is run.hosts and data.phases is run.phases:
        return data
    return _StageData.of(run)


def running_record(
    s: Session, execution_id: str, stage_index: int, phase: int, kind: str
) -> tuple[Execution, StageRun, PhaseRun] | None:
    """The locked execution, its stage and the phase record of ``kind`` that still waits for
    its verdict; None when there is nothing left to judge (a repeated gate, an ended run)."""
    ex = lock_execution(s, execution_id)
    if ex is None or ex.status in Status.TERMINAL:
        return None
    pr = s.exec(
        select(PhaseRun).where(
            PhaseRun.execution_id == execution_id,
            PhaseRun.stage_index == stage_index,
            PhaseRun.phase == phase,
            PhaseRun.kind == kind,
        )
    ).first()
    if pr is None or pr.status != Status.RUNNING:
        return None
    return ex, stage_run(s, ex, stage_index), pr


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
            step_id = step_identifier(stage, key) if stage else ""
            row = HostStepRun(
                idem_key=key.idem,
                execution_id=key.execution,
                stage_index=key.stage,
                phase=key.phase,
                step_index=key.step,
                step_id=step_id,
                host=key.host,
                region=key.region,
                attempt=key.attempt,
            )
        row.status, row.error_class, row.error = Status.FAILED, error_class, error
        row.finished_at = utcnow()
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:  # the task claimed it meanwhile: its own outcome wins
            pass


def step_identifier(ex: Execution, key: HostStepKey) -> str:
    """The identifier of the step a key names ('' when it names one of another plan)."""
    stage = stage_of(ex, key.stage)
    steps = stage.steps if key.kind == "deploy" else [] if key.src else stage.rollback_steps
    return steps[key.step].identifier if 0 <= key.step < len(steps) else ""


def summarise_steps(s: Session, ex: Execution, run: StageRun) -> None:
    """Each step's counts over the stage's hosts (every attempt), summed in SQL."""
    counts: dict[int, dict[str, int]] = {}
    for step_index, status, n in s.exec(
        select(HostStepRun.step_index, HostStepRun.status, func.count())
        .where(
            HostStepRun.execution_id == ex.id,
            HostStepRun.stage_index == run.stage_index,
            HostStepRun.kind == "deploy",
        )
        .group_by(col(HostStepRun.step_index), col(HostStepRun.status))
    ).all():
        counts.setdefault(step_index, {})[status] = n
    times = {
        step_index: (first, last)
        for step_index, first, last in s.exec(
            select(
                HostStepRun.step_index,
                func.min(HostStepRun.started_at),
                func.max(HostStepRun.finished_at),
            )
            .where(
                HostStepRun.execution_id == ex.id,
                HostStepRun.stage_index == run.stage_index,
                HostStepRun.kind == "deploy",
            )
            .group_by(col(HostStepRun.step_index))
        ).all()
    }
    steps = s.exec(
        select(StepRun).where(StepRun.execution_id == ex.id, StepRun.stage_index == run.stage_index)
    ).all()
    for st in steps:
        mine = counts.get(st.step_index, {})
        st.succeeded = mine.get(Status.SUCCEEDED, 0)
        st.failed = mine.get(Status.FAILED, 0)
        st.skipped = mine.get(Status.SKIPPED, 0)
        st.started_at, st.finished_at = times.get(st.step_index, (None, None))
        st.status = (
            Status.FAILED if st.failed else Status.SUCCEEDED if st.succeeded else Status.SKIPPED
        )
        s.add(st)


def finish(s: Session, ex: Execution, status: str, *, error: str | None = None) -> None:
    ex.status, ex.finished_at = status, utcnow()
    if error:
        ex.error = error
    for run in s.exec(
        select(StageRun).where(StageRun.execution_id == ex.id, StageRun.status == Status.PENDING)
    ).all():
        run.status = Status.SKIPPED
        s.add(run)
    s.add(ex)


# What a failed stage returns when the pipeline goes on: a later stage runs after a failure
# (``when: {pipelineStatus: Failure | All}``). ``advance`` then decides again at once.
GO_ON = "a stage failed; the stages that run after a failure go on"
# Stages in these states make the pipeline "failed so far" for the stages after them.
FAILED_STAGES = frozenset({Status.FAILED, Status.ROLLED_BACK})


def after_failure_status(stage: AnyStagePlan) -> str:
    """The pipeline status a stage's ``when`` asks for (Success without one)."""
    when = stage.when
    return (when.pipeline_status or when.stage_status or "Success") if when else "Success"


def end_failed(s: Session, ex: Execution, error: str) -> str | None:
    """A stage failed for good: the execution ends FAILED, unless a later stage runs after a
    failure; then it goes on with the next stage (GO_ON) and ends FAILED after the last one."""
    stages = plan_of(ex).stages
    if not any(after_failure_status(st) != "Success" for st in stages[ex.current_stage + 1 :]):
        finish(s, ex, Status.FAILED, error=error)
        return None
    ex.error, ex.status = error, Status.RUNNING
    ex.current_stage += 1
    s.add(ex)
    return GO_ON


def failed_so_far(s: Session, ex: Execution) -> bool:
    """Did a stage before the current one fail (the pipeline went on after it)?"""
    return (
        s.exec(
            select(StageRun.id).where(
                StageRun.execution_id == ex.id,
                StageRun.stage_index < ex.current_stage,
                col(StageRun.status).in_(list(FAILED_STAGES)),
            )
        ).first()
        is not None
    )


def all_static(stage: AnyStagePlan) -> bool:
    return all(i.provider == "static" for i in stage.infrastructures)


def live_set(s: Session, stage: DeploymentStagePlan) -> list[str]:
    """Hosts that took traffic after the last successful switch for this service and
    environment (the ledger's memory of blue-green; the switch task checks the real one)."""
    svc = stage.service.identifier
    env = stage.environment.identifier
    rows = s.exec(
        select(PhaseRun)
        .where(
            col(PhaseRun.kind).in_(["switch", "rollback-switch"]),
            PhaseRun.status == Status.SUCCEEDED,
        )
        .order_by(col(PhaseRun.gate_at).desc())
        .limit(200)
    ).all()
    for r in rows:
        v = r.verdict or {}
        if v.get("service") == svc and v.get("environment") == env:
            return list(v.get("live", []))
    return []
