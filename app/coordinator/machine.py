"""The state machine: ``advance()`` is the only place that decides what happens next.

It is idempotent and may be called any number of times, from the CLI, a gate, an error
callback or the reconciler: it locks the execution row (``SELECT ... FOR UPDATE``; SQLite:
``BEGIN IMMEDIATE``), reads the ledger, records its decision (a unique PhaseRun row per
dispatch), and publishes the next canvas only after the commit.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.coordinator.approvals import decide_approval_stage
from app.coordinator.barriers import decide_barrier
from app.coordinator.chaining import decide_pipeline_stage
from app.coordinator.discovery import decide_discovery, discover_stage
from app.coordinator.failure import fail_stage, stage_failed
from app.coordinator.ledger import (
    GO_ON,
    after_failure_status,
    deployment_stage,
    end_failed,
    failed_so_far,
    finish,
    live_set,
    lock_execution,
    plan_of,
    stage_data,
    stage_run,
    summarise_steps,
)
from app.coordinator.publish import Dispatch, publish, publish_notifications
from app.coordinator.rollback import decide_rollback, roll_back_stage, rolled_back_count
from app.coordinator.routing import discovered_by_workers, tags_of
from app.coordinator.verdicts import evaluate_phase, failures_of, phase_failure
from app.coordinator.watch import decide_watch
from app.db import session_scope
from app.definitions.plan import (
    AnyStagePlan,
    ApprovalStagePlan,
    DeploymentStagePlan,
    PipelineStagePlan,
    StageConcurrency,
)
from app.errors import ConfigError, SpecError
from app.models import (
    Execution,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)
from app.providers.base import Host
from app.settings import get_settings
from strategies.basic import Phase


def advance(execution_id: str) -> str:
    """Decide and perform the next action for an execution; returns what it did."""
    dispatches: list[Dispatch] = []
    with session_scope() as s:
        ex = lock_execution(s, execution_id)
        if ex is None:
            return "missing"
        if ex.status in Status.TERMINAL:
            return "noop"
        before = notify_snapshot(s, ex)
        decision = _decide(s, ex, dispatches)
        while decision == GO_ON:  # a stage failed and a later one runs after a failure
            decision = _decide(s, ex, dispatches)
        after = notify_snapshot(s, ex)
        parent = ex.parent_execution_id if ex.status in Status.TERMINAL else None
    # Publish only after COMMIT: a task must never run before its rows are visible.
    for d in dispatches:
        publish(d)
    notify_transition(execution_id, before, after)
    wake_parent(parent)
    return decision


def wake_parent(parent_id: str | None) -> None:
    """A chained pipeline's execution ended: its parent's Pipeline stage decides again (after
    the child's commit: the parent reads the child's final status)."""
    if parent_id is not None:
        advance(parent_id)


def _decide(s: Session, ex: Execution, dispatches: list[Dispatch]) -> str:
    if ex.status == Status.ROLLING_BACK:
        return decide_rollback(s, ex, dispatches)
    stages = plan_of(ex).stages
    while True:
        if ex.current_stage >= len(stages):
            if failed_so_far(s, ex):  # the pipeline went on after a failed stage
                finish(s, ex, Status.FAILED, error=ex.error)
                return "failed"
            finish(s, ex, Status.SUCCEEDED)
            return "succeeded"
        stage_plan = stages[ex.current_stage]
        group = stage_plan.concurrency if isinstance(stage_plan, DeploymentStagePlan) else None
        if group is not None:  # a looped stage's iterations side by side
            outcome = _decide_group(s, ex, group, dispatches)
        else:
            run = stage_run(s, ex, ex.current_stage)
            outcome = _decide_stage(s, ex, run, stage_plan, dispatches)
        if outcome:
            return outcome
        ex.current_stage = (group.last if group is not None else ex.current_stage) + 1
        s.add(ex)


# A looped stage's iteration in these states ended badly: the iterations not started yet do
# not start, and the execution ends FAILED once those in flight have ended.
_ENDED_BADLY = frozenset(
    {Status.FAILED, Status.ROLLED_BACK, Status.ROLLBACK_FAILED, Status.ABORTED}
)


def _in_flight(run: StageRun) -> bool:
    """Started and not ended (a PENDING stage with a start time is discovering its hosts)."""
    return run.status in (Status.RUNNING, Status.ROLLING_BACK) or (
        run.status == Status.PENDING and run.started_at is not None
    )


def _decide_group(
    s: Session, ex: Execution, group: StageConcurrency, dispatches: list[Dispatch]
) -> str:
    """The iterations ``group.first`` to ``group.last`` of a looped stage, side by side: those
    in flight go on (one that failed rolls back alone), then iterations not started yet start
    in order while fewer than ``group.cap`` are in flight. '' once every one succeeded (or was
    skipped by its when); the execution ends FAILED (or goes on to a stage that runs after a
    failure) once every one ended and one of them failed."""
    stages = plan_of(ex).stages
    said: list[str] = []

    def step(run: StageRun) -> bool:
        """Decide for one iteration; False when the execution ended (an Abort)."""
        if run.status == Status.ROLLING_BACK:
            out = roll_back_stage(s, ex, run, dispatches)
        else:
            stage_plan = stages[run.stage_index]
            assert isinstance(stage_plan, DeploymentStagePlan)
            out = _decide_stage(s, ex, run, stage_plan, dispatches)
        if out:
            said.append(out if out.startswith("stage '") else f"{run.identifier}: {out}")
        return ex.status not in Status.TERMINAL

    runs = [stage_run(s, ex, i) for i in range(group.first, group.last + 1)]
    for run in runs:  # those in flight first: each may end and free its place
        if _in_flight(run) and not step(run):
            return said[-1] if said else str(ex.status).lower()
    in_flight = sum(1 for r in runs if _in_flight(r))
    for run in runs:
        if run.status != Status.PENDING or run.started_at is not None:
            continue
        if any(r.status in _ENDED_BADLY for r in runs):
            run.status, run.finished_at = Status.SKIPPED, utcnow()
            run.error = "skipped: an iteration of its loop failed"
            s.add(run)
            continue
        if in_flight >= group.cap:
            break  # it starts when one in flight ends
        if not step(run):
            return said[-1] if said else str(ex.status).lower()
        in_flight += _in_flight(run)
    if any(_in_flight(r) or r.status == Status.PENDING for r in runs):
        return "; ".join(said) or "waiting"
    bad = [r for r in runs if r.status in _ENDED_BADLY]
    if not bad:
        return ""
    ex.current_stage = group.last  # the stages after the loop come next
    s.add(ex)
    error = "; ".join(f"stage '{r.identifier}': {r.error}{_rolled_back(s, ex, r)}" for r in bad)
    if any(r.status == Status.ROLLBACK_FAILED for r in bad):
        finish(s, ex, Status.ROLLBACK_FAILED, error=f"{error}; the rollback failed on some hosts")
        return "rollback failed"
    return end_failed(s, ex, error) or "failed"


def _rolled_back(s: Session, ex: Execution, run: StageRun) -> str:
    if run.status != Status.ROLLED_BACK:
        return ""
    done = rolled_back_count(s, ex, run.stage_index)
    return (
        f"; rolled back {done} host(s)"
        if done
        else "; nothing was rolled back (no host had an earlier version recorded)"
    )


def _decide_stage(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage_plan: AnyStagePlan,
    dispatches: list[Dispatch],
) -> str:
    """One stage (or one iteration of a looped stage): what is under way, or '' once it
    succeeded or was skipped (the caller goes on)."""
    if run.status == Status.PENDING:
        why = stage_skip(stage_plan, failed=ex.current_stage > 0 and failed_so_far(s, ex))
        if why:
            run.status, run.error, run.finished_at = Status.SKIPPED, why, utcnow()
            s.add(run)
    if run.status == Status.SKIPPED:  # by its when; or a retry leaves out stages that
        return ""  # need nothing
    if isinstance(stage_plan, ApprovalStagePlan):
        return decide_approval_stage(s, ex, run, stage_plan, dispatches)
    if isinstance(stage_plan, PipelineStagePlan):  # a child execution of its own
        return decide_pipeline_stage(s, ex, run, stage_plan, dispatches) or ""
    if run.status == Status.PENDING and not run.hosts and discovered_by_workers(stage_plan):
        outcome = decide_discovery(s, ex, run, stage_plan, dispatches)
        if outcome:
            return outcome
    if run.status == Status.PENDING:
        problem = _start_stage(s, ex, run, stage_plan)
        if problem:
            return stage_failed(
                s, ex, run, problem, [(None, "Unknown")], None, dispatches
            ) or fail_stage(s, ex, run, problem)
    # Phases run one after another: every phase before the last one dispatched has passed
    # its gates. Read the records from that one on (not all of them at every advance).
    latest = s.exec(
        select(func.max(PhaseRun.phase)).where(
            PhaseRun.execution_id == ex.id,
            PhaseRun.stage_index == run.stage_index,
            col(PhaseRun.kind).in_(["deploy", "switch"]),
        )
    ).one()
    records = {
        (p.phase, p.kind): p
        for p in s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == run.stage_index,
                PhaseRun.phase >= (latest if latest is not None else -1),
            )
        ).all()
    }
    verification = stage_plan.strategy.verification
    start = 0 if latest is None else stage_data(s, ex, run).position.get(int(latest), 0)
    for i in range(start, len(run.phases)):
        phase = Phase.from_dict(run.phases[i])
        main = records.get((phase.index, phase.kind))
        if main is None:
            _dispatch(s, ex, run, phase, phase.kind, dispatches)
            return f"dispatched {phase.name}"
        if main.status == Status.RUNNING and not (
            phase.kind == "deploy" and evaluate_phase(s, ex, run, main, gate=False)
        ):
            # Hosts stopped at a Wait or approval step wait for the coordinator.
            said = (
                decide_barrier(s, ex, run, stage_plan, main, dispatches)
                if phase.kind == "deploy"
                else "waiting"
            )
            if said is not None or not evaluate_phase(s, ex, run, main, gate=False):
                return said or "waiting"
        if main.status == Status.FAILED:
            outcome = stage_failed(
                s,
                ex,
                run,
                phase_failure(phase, main),
                failures_of(stage_plan, main),
                main,
                dispatches,
            )
            if outcome:
                return outcome
        if phase.verify and verification:
            check = records.get((phase.index, "verify"))
            if check is None:
                _dispatch(s, ex, run, phase, "verify", dispatches)
                return f"verifying {phase.name}"
            if check.status == Status.RUNNING:
                return "waiting"
            if check.status == Status.FAILED:
                outcome = stage_failed(
                    s,
                    ex,
                    run,
                    phase_failure(phase, check),
                    [(None, "Verification")],
                    check,
                    dispatches,
                )
                if outcome:
                    return outcome
    # The watch after deployment (rollbackStrategy.triggers) holds the stage open.
    watching = decide_watch(s, ex, run, stage_plan, dispatches)
    if watching is not None:
        return watching
    summarise_steps(s, ex, run)
    run.status, run.finished_at = Status.SUCCEEDED, utcnow()
    s.add(run)
    return ""


def stage_skip(stage: AnyStagePlan, *, failed: bool) -> str:
    """Why the stage does not run ('' when it does): an earlier stage ``failed`` and its
    ``when`` does not ask to run after a failure, or it asks for a failure and none happened,
    or its condition (bound when the plan was resolved: only literals are left) is false."""
    from app.definitions.conditions import ConditionError, evaluate, parse

    wanted = after_failure_status(stage)
    if failed and wanted == "Success":
        return (
            "skipped: an earlier stage failed"
            if stage.when is None
            else f"{Status.WHEN}pipelineStatus Success, and an earlier stage failed"
        )
    if not failed and wanted == "Failure":
        return f"{Status.WHEN}pipelineStatus Failure, and no earlier stage failed"
    condition = stage.when.condition if stage.when is not None else None
    if not condition:
        return ""

    def lookup(name: str) -> str:
        raise ConditionError(f"<+{name}> has no value when the stage starts")

    try:
        runs = evaluate(parse(condition), lookup)
    except ConditionError as exc:
        return f"{Status.WHEN}its condition could not be judged: {exc}"
    return "" if runs else f"{Status.WHEN}condition {condition} is false"


def _start_stage(s: Session, ex: Execution, run: StageRun, stage_plan: DeploymentStagePlan) -> str:
    """Discover the stage's hosts and plan its phases; '' or an error message."""
    from strategies import plan as plan_phases

    try:
        hosts = [Host.from_dict(h) for h in run.hosts] or discover_stage(
            stage_plan, execution_id=ex.id, s=s
        )
        names = [h.name for h in hosts]
        slots = {h.name: str(h.attributes["slot"]) for h in hosts if h.attributes.get("slot")}
        live = live_set(s, stage_plan) if stage_plan.strategy.type == "BlueGreen" else []
        phases = plan_phases(stage_plan.strategy, names, live=live, slots=slots)
    except (ConfigError, SpecError, ValueError) as exc:
        return str(exc)
    # Rewrite the (large) host list only when it was not stored in its normal form already.
    normal = [{f.name: getattr(h, f.name) for f in fields(Host)} for h in hosts]
    if normal != run.hosts:
        run.hosts = [h.to_dict() for h in hosts]
    run.phases = [p.to_dict() for p in phases]
    run.status, run.started_at = Status.RUNNING, utcnow()
    if ex.status == Status.QUEUED:
        ex.status, ex.started_at = Status.RUNNING, utcnow()
    s.add(ex)
    s.add(run)
    return ""


def _dispatch(
    s: Session, ex: Execution, run: StageRun, phase: Phase, kind: str, out: list[Dispatch]
) -> None:
    by_name = stage_data(s, ex, run).by_name
    s.add(
        PhaseRun(
            execution_id=ex.id,
            stage_index=run.stage_index,
            phase=phase.index,
            kind=kind,
            hosts=list(phase.hosts),
        )
    )
    s.flush()  # the unique (execution, stage, phase, kind) row: a second dispatch fails here
    stage_plan = deployment_stage(ex, run.stage_index)
    analysis = (
        stage_plan.strategy.verification.canary_analysis
        if kind == "verify" and stage_plan.strategy.verification
        else None
    )
    out.append(
        Dispatch(
            kind,
            ex.id,
            run.stage_index,
            phase.index,
            [(n, by_name[n]["region"]) for n in phase.hosts],
            step_count=len(stage_plan.steps),
            lanes=stage_plan.strategy.max_concurrency,
            tags_of=tags_of(stage_plan, [by_name[n] for n in phase.hosts], stage_plan.steps),
            # A canary analysis judges the window after the phase: its checks wait
            # that long in the broker (no worker sleeps).
            countdown=analysis.window_seconds() if analysis else 0.0,
        )
    )


def notify_snapshot(s: Session, ex: Execution) -> dict[str, Any] | None:
    """What notifications compare (app.notify.snapshot); None when the pipeline has no
    notification rules (nothing to compare, nothing to read)."""
    if not plan_of(ex).notification_rules:
        return None
    from app.notify import snapshot

    s.flush()
    runs: Any = s.exec(
        select(StageRun.stage_index, StageRun.status).where(  # no hosts
            StageRun.execution_id == ex.id
        )
    ).all()
    snap = snapshot(ex, runs)
    if (
        snap["waiting"] == "intervention"
        and s.exec(
            select(PhaseRun.id).where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == ex.current_stage,
                PhaseRun.kind == "approval",
                PhaseRun.status == Status.RUNNING,
            )
        ).first()
    ):
        snap["waiting"] = "approval"  # an approval step among the stage's steps
    return snap


def notify_transition(
    execution_id: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> None:
    """Send the notifications of a transition (pipeline started, failed, stage failed,
    approval needed, rollback done...) once, after the commit: from a control task, so a slow
    webhook never holds up the coordinator; inline in embedded mode (the worker there stops
    with the run)."""
    if after is None or before == after:
        return
    from app.notify import events_for

    if not events_for(before, after):
        return
    if get_settings().embedded:
        send_notifications(execution_id, before, after)
        return
    publish_notifications(execution_id, before, after)


def send_notifications(
    execution_id: str, before: dict[str, Any] | None, after: dict[str, Any]
) -> int:
    """Deliver the transition's notifications, secrets masked; returns how many were sent.
    Each transition is seen once, under the execution's lock, so each event is sent once."""
    from app.notify import notify_transition
    from app.secrets import mask

    sent = notify_transition(execution_id, before, after, claim=lambda _key: True, mask=mask)
    return sum(1 for d in sent if d.ok)
