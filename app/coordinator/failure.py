"""Failure strategies at the stage: which action applies (Harness precedence), and what it
does: ignore, fail, abort, wait for a person, or roll back.
"""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, col, select

from app.coordinator.ledger import end_failed, finish, stage_of, summarise_steps
from app.coordinator.precedence import stage_action
from app.coordinator.publish import Dispatch
from app.coordinator.retry import cancel_pending
from app.coordinator.rollback import begin_iteration_rollback, begin_rollback
from app.definitions.base import parse_duration
from app.definitions.models import INTERVENTION_ACTIONS, FailureAction
from app.definitions.plan import DeploymentStagePlan, StepPlan
from app.models import (
    Execution,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)


def stage_failed(
    s: Session,
    ex: Execution,
    run: StageRun,
    error: str,
    failures: list[tuple[StepPlan | None, str]],
    record: PhaseRun | None,
    dispatches: list[Dispatch],
) -> str:
    """Apply the stage's failure strategy; '' when the failure was overridden (Ignore,
    MarkAsSuccess) and the stage goes on, else what happened."""
    action = stage_action(stage_of(ex, run.stage_index), failures)
    intervention = action.intervention
    if intervention is not None:
        kind = f"mi-{record.kind if record else 'start'}"
        phase = record.phase if record else -1
        mi = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == run.stage_index,
                PhaseRun.phase == phase,
                PhaseRun.kind == kind,
            )
        ).first()
        timeout = parse_duration(intervention.timeout)
        if mi is None:
            s.add(
                PhaseRun(
                    execution_id=ex.id,
                    stage_index=run.stage_index,
                    phase=phase,
                    kind=kind,
                    hosts=list((record.verdict or {}).get("failed", [])) if record else [],
                    verdict={
                        "error": error,
                        "timeout": intervention.timeout,
                        "on_timeout": intervention.on_timeout.action.type,
                        "choices": list(INTERVENTION_ACTIONS),
                    },
                )
            )
            ex.status = Status.WAITING
            s.add(ex)
            # The post-timeout action is due then: wake the coordinator (the reconciler too).
            dispatches.append(
                Dispatch("timer", ex.id, run.stage_index, phase, [], countdown=timeout + 0.5)
            )
            return "waiting for manual intervention"
        if mi.status == Status.RUNNING:
            if utcnow() < mi.dispatched_at + timedelta(seconds=timeout):
                return "waiting for manual intervention"
            verdict = dict(mi.verdict or {})
            verdict.update(
                chosen=verdict["on_timeout"], by="timeout", at=utcnow().isoformat() + "Z"
            )
            mi.verdict, mi.status, mi.gate_at = verdict, Status.SUCCEEDED, utcnow()
            s.add(mi)
            ex.status = Status.RUNNING
            s.add(ex)
        v = mi.verdict or {}
        action = FailureAction(type=v["chosen"])
        who = (
            f"after the {v.get('timeout')} timeout"
            if v.get("by") == "timeout"
            else f"by {v.get('by')}"
        )
        error = f"{error}; manual intervention: {action.type} {who}"
    kind_of = action.type
    if side_by_side(ex, run) and kind_of not in ("Ignore", "MarkAsSuccess"):
        return _iteration_failed(s, ex, run, error, kind_of, dispatches)
    if kind_of in ("Ignore", "MarkAsSuccess") and record is not None:
        verdict = dict(record.verdict or {})
        verdict.update(
            overridden=kind_of, overridden_failed=verdict.get("failed", []), failed=[], passed=True
        )
        record.verdict, record.status = verdict, Status.SUCCEEDED
        s.add(record)
        return ""
    if kind_of == "Abort":
        summarise_steps(s, ex, run)
        run.status, run.error, run.finished_at = Status.ABORTED, error, utcnow()
        s.add(run)
        finish(
            s,
            ex,
            Status.ABORTED,
            error=f"stage '{run.identifier}': {error} (aborted by the failure strategy)",
        )
        return "aborted"
    if kind_of == "StageRollback" and stage_of(ex, run.stage_index).type == "Custom":
        return fail_stage(
            s, ex, run, f"{error} (a Custom stage deploys nothing: there is nothing to roll back)"
        )
    if kind_of in ("StageRollback", "PipelineRollback"):
        return begin_rollback(
            s, ex, run, error, scope=kind_of, cause="failure", dispatches=dispatches
        )
    return fail_stage(s, ex, run, error)


def fail_stage(s: Session, ex: Execution, run: StageRun, error: str) -> str:
    """The stage fails; so does the execution, unless a later stage runs after a failure
    (then GO_ON). An iteration of a looped stage run side by side fails alone: the execution
    ends once its other iterations have (app.coordinator.machine)."""
    summarise_steps(s, ex, run)
    run.status, run.error, run.finished_at = Status.FAILED, error, utcnow()
    s.add(run)
    if side_by_side(ex, run):
        return f"stage '{run.identifier}' failed; the iterations in flight with it go on"
    return end_failed(s, ex, f"stage '{run.identifier}': {error}") or "failed"


def side_by_side(ex: Execution, run: StageRun) -> bool:
    """Is the stage an iteration of a loop whose iterations run side by side?"""
    return getattr(stage_of(ex, run.stage_index), "concurrency", None) is not None


def _iteration_failed(
    s: Session, ex: Execution, run: StageRun, error: str, kind_of: str, dispatches: list[Dispatch]
) -> str:
    """An iteration side by side failed: StageRollback rolls back its hosts alone, Abort stops
    every iteration in flight, MarkAsFailure fails it alone. (PipelineRollback and
    ManualIntervention are refused at load: app.definitions.stage_concurrency.)"""
    if kind_of == "Abort":
        summarise_steps(s, ex, run)
        run.status, run.error, run.finished_at = Status.ABORTED, error, utcnow()
        s.add(run)
        stop_execution(
            s,
            ex,
            f"stage '{run.identifier}': {error} (aborted by the failure strategy)",
        )
        return "aborted"
    if kind_of in ("StageRollback", "PipelineRollback"):
        return begin_iteration_rollback(s, ex, run, error, dispatches)
    return fail_stage(s, ex, run, error)


def stop_execution(s: Session, ex: Execution, error: str) -> None:
    """End the execution ABORTED: attempts waiting to start never do, running phases and
    stages (every iteration in flight of a looped stage) are aborted, their running hosts stop
    at their next unit."""
    cancel_pending(s, ex.id, f"skipped: {error} before this attempt started")
    for pr in s.exec(
        select(PhaseRun).where(PhaseRun.execution_id == ex.id, PhaseRun.status == Status.RUNNING)
    ).all():
        if pr.kind != "rollback":
            pr.status, pr.gate_at = Status.ABORTED, utcnow()
            s.add(pr)
    finish(s, ex, Status.ABORTED, error=error)
    for other in s.exec(
        select(StageRun).where(
            StageRun.execution_id == ex.id,
            col(StageRun.status).in_([Status.RUNNING, Status.ROLLING_BACK]),
        )
    ).all():
        summarise_steps(s, ex, other)
        other.status, other.finished_at = Status.ABORTED, utcnow()
        other.error = other.error or error
        s.add(other)


def failure_policy(stage: DeploymentStagePlan) -> str:
    """What happens when hosts of the stage fail, in one sentence (``vmfarm plan``)."""
    budget = stage.strategy.failure_budget
    allowed = budget.max_failed_hosts
    pct = budget.max_failed_percent
    tolerance = (
        f"up to {allowed} host(s) or {pct:g}% may fail; more fails the stage"
        if allowed or pct
        else "any failed host fails the stage"
    )
    action = stage_action(stage, [(None, "AllErrors")]).type
    if stage.type == "Custom":
        then = {
            "StageRollback": "the stage fails (a Custom stage has nothing to roll back)",
            "PipelineRollback": "the earlier Deployment stages roll back",
            "MarkAsFailure": "the stage fails",
        }.get(action, "")
        then = then or _THEN[action]
        return f"a failed step fails the stage; later stages do not start; {then}."
    how = (
        "its rollbackSteps run on every host it changed"
        if stage.rollback_steps
        else "every host it changed is redeployed with its previous version"
    )
    then = {
        "StageRollback": f"the stage rolls back ({how}), phases in reverse order",
        "PipelineRollback": f"this stage and the earlier ones roll back ({how})",
        **_THEN,
    }[action]
    if stage.concurrency is not None:  # an iteration side by side with others
        alone = {
            "StageRollback": f"this iteration rolls back alone ({how})",
            "MarkAsFailure": "this iteration fails alone; its hosts keep what they have",
            "Abort": "the execution is aborted: every iteration in flight stops; hosts keep "
            "what they have",
        }.get(action)
        if alone:
            return (
                f"{tolerance}; later phases do not start; {alone}; the iterations in flight "
                "with it finish and keep what they did, those not started and later stages do "
                "not start, and the pipeline ends FAILED."
                if action != "Abort"
                else f"{tolerance}; {alone}."
            )
    return f"{tolerance}; later phases and stages do not start; {then}."


_THEN = {
    "Abort": "the execution is aborted; hosts keep what they have",
    "ManualIntervention": "the execution waits for a person (vmfarm intervene)",
    "MarkAsFailure": "the stage fails; hosts keep what they have",
    "Ignore": "the failure is ignored and the stage goes on",
    "MarkAsSuccess": "the failure is marked as success and the stage goes on",
}
