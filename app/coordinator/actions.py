"""What a person does to a running execution: approve or reject, answer a manual
intervention, abort (with or without a rollback).
"""

from __future__ import annotations

from collections.abc import Collection

from sqlmodel import Session, col, select

from app.coordinator.approvals import approval_record, approvers
from app.coordinator.chaining import running_children
from app.coordinator.ledger import finish, lock_execution, plan_of, stage_of
from app.coordinator.machine import advance, notify_snapshot, notify_transition, wake_parent
from app.coordinator.publish import Dispatch, publish
from app.coordinator.retry import cancel_pending
from app.coordinator.rollback import begin_rollback
from app.db import session_scope
from app.definitions.models import INTERVENTION_ACTIONS
from app.definitions.plan import ApprovalStagePlan, DeploymentStagePlan
from app.errors import ApprovalRefused
from app.models import (
    Execution,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)


def decide_approval(
    execution_id: str,
    *,
    user: str,
    approve: bool,
    comment: str = "",
    groups: Collection[str] | None = None,
    token_id: str | None = None,
) -> str:
    """Record an approval or a rejection by ``user``; returns what it did.

    ``user`` is compared with the execution's creator (``disallowPipelineExecutor``) and
    with earlier votes (one vote each). Who is an approver: with ``groups`` (the server: a
    verified token's groups and the server's users file), a member of one of them; without,
    a member in the users file (``VMFARM_USERS_FILE``). ``token_id`` (an API token's, or a
    token's ``jti``) is recorded with the vote.

    Raises ApprovalRefused (not an approver, the pipeline's executor when that is disallowed,
    a second vote) and LookupError (no such execution, or it waits for no approval).
    """
    with session_scope() as s:
        ex = lock_execution(s, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        rec = approval_record(s, ex, ex.current_stage) if ex.status == Status.WAITING else None
        if rec is None or rec.status != Status.RUNNING:
            raise LookupError(
                f"execution {execution_id} is not waiting for an approval (it is {ex.status})"
            )
        stage = stage_of(ex, ex.current_stage)
        verdict = dict(rec.verdict or {})
        # Who may vote: written in the record when it was opened (an approval step's, or an
        # Approval stage's); an older Approval stage record reads its stage.
        asked = list(verdict.get("groups") or [])
        disallow = verdict.get("disallow_executor")
        if isinstance(stage, ApprovalStagePlan):
            asked = asked or stage.approval.spec.approvers.user_groups
            if disallow is None:
                disallow = stage.approval.spec.approvers.disallow_pipeline_executor
        member = bool(set(asked) & set(groups)) if groups is not None else user in approvers(asked)
        if not user or not member:
            raise ApprovalRefused(
                f"{user or 'this user'} is not in the approver groups {', '.join(asked)}"
            )
        if approve and disallow and user == ex.created_by:
            raise ApprovalRefused(
                f"{user} started this execution and this approval disallows "
                "the pipeline executor; another approver must approve"
            )
        if any(a["user"] == user for a in verdict.get("approvals", [])):
            raise ApprovalRefused(f"{user} has already approved this execution")
        entry = {
            "user": user,
            "comment": comment,
            "at": utcnow().isoformat() + "Z",
            **({"token_id": token_id} if token_id else {}),
        }
        if approve:
            verdict["approvals"] = [*verdict.get("approvals", []), entry]
            done = len(verdict["approvals"]) >= int(verdict.get("required", 1))
            if done:
                rec.status, rec.gate_at = Status.SUCCEEDED, utcnow()
                ex.status = Status.RUNNING
            outcome = (
                f"approved by {user} ({len(verdict['approvals'])} of {verdict.get('required', 1)})"
            )
        else:
            verdict["rejected_by"] = entry
            verdict["reason"] = f"approval rejected by {user}" + (f": {comment}" if comment else "")
            rec.status, rec.gate_at = Status.FAILED, utcnow()
            ex.status = Status.RUNNING
            done = True
            outcome = f"rejected by {user}"
        rec.verdict = verdict
        s.add(rec)
        s.add(ex)
    if done:
        outcome += f"; execution {advance(execution_id)}"
    return outcome


def intervene(execution_id: str, *, action: str, user: str = "", comment: str = "") -> str:
    """A person's answer to a ManualIntervention: one of INTERVENTION_ACTIONS."""
    if action not in INTERVENTION_ACTIONS:
        raise ApprovalRefused(
            f"unknown action {action!r}; choose one of {', '.join(INTERVENTION_ACTIONS)}"
        )
    with session_scope() as s:
        ex = lock_execution(s, execution_id)
        if ex is None:
            raise LookupError(f"no execution '{execution_id}'")
        mi = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == execution_id,
                col(PhaseRun.kind).startswith("mi-"),
                PhaseRun.status == Status.RUNNING,
            )
        ).first()
        if mi is None or ex.status != Status.WAITING:
            raise LookupError(
                f"execution {execution_id} is not waiting for a manual "
                f"intervention (it is {ex.status})"
            )
        verdict = dict(mi.verdict or {})
        verdict.update(
            chosen=action, by=user or "someone", comment=comment, at=utcnow().isoformat() + "Z"
        )
        mi.verdict, mi.status, mi.gate_at = verdict, Status.SUCCEEDED, utcnow()
        ex.status = Status.RUNNING
        s.add(mi)
        s.add(ex)
    return f"{action} chosen by {user or 'someone'}; execution {advance(execution_id)}"


def _in_flight(s: Session, ex: Execution) -> tuple[StageRun | None, list[StageRun]]:
    """The current stage's row, and with a looped stage whose iterations run side by side,
    the first of them running and the others in flight with it (running, or rolling back
    their own failure)."""
    stages = plan_of(ex).stages
    stage = stages[ex.current_stage] if ex.current_stage < len(stages) else None
    group = stage.concurrency if isinstance(stage, DeploymentStagePlan) else None
    if group is None:
        current = s.exec(
            select(StageRun).where(
                StageRun.execution_id == ex.id, StageRun.stage_index == ex.current_stage
            )
        ).first()
        return current, []
    flight = s.exec(
        select(StageRun)
        .where(
            StageRun.execution_id == ex.id,
            col(StageRun.stage_index).between(group.first, group.last),
            col(StageRun.status).in_([Status.RUNNING, Status.ROLLING_BACK]),
        )
        .order_by(col(StageRun.stage_index))
    ).all()
    first = next((r for r in flight if r.status == Status.RUNNING), None)
    return first, [r for r in flight if r is not first]


def abort(execution_id: str, *, user: str = "", rollback: bool = False) -> str:
    """Stop an execution: no new work is sent; running hosts stop at their next unit (every
    iteration in flight of a looped stage run side by side).

    With ``rollback``, the current stage (each iteration in flight) then rolls back the hosts
    it changed (once their running steps have stopped). Returns "aborted", "rolling back",
    "missing", or the status of an execution that had already ended.
    """
    dispatches: list[Dispatch] = []
    with session_scope() as s:
        ex = lock_execution(s, execution_id)
        if ex is None:
            return "missing"
        if ex.status in Status.TERMINAL:
            return ex.status
        before = notify_snapshot(s, ex)
        who = f" by {user}" if user else ""
        cancel_pending(
            s, execution_id, f"skipped: the execution was aborted{who} before this attempt started"
        )
        for pr in s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == execution_id, PhaseRun.status == Status.RUNNING
            )
        ).all():
            if pr.kind != "rollback":
                pr.status, pr.gate_at = Status.ABORTED, utcnow()
                s.add(pr)
        current, together = _in_flight(s, ex)
        if (
            rollback
            and ex.status != Status.ROLLING_BACK
            and current is not None
            and stage_of(ex, current.stage_index).type not in ("Approval", "Custom", "Pipeline")
            and current.status == Status.RUNNING
        ):
            begin_rollback(
                s,
                ex,
                current,
                f"aborted{who}",
                scope="StageRollback",
                cause="aborted",
                dispatches=dispatches,
                together=together,
            )
            outcome = "rolling back"
        else:
            finish(s, ex, Status.ABORTED, error=f"aborted{who}")
            for run in s.exec(
                select(StageRun).where(
                    StageRun.execution_id == execution_id,
                    col(StageRun.status).in_([Status.RUNNING, Status.ROLLING_BACK]),
                )
            ).all():
                run.status, run.finished_at = Status.ABORTED, utcnow()
                s.add(run)
            outcome = "aborted"
        after = notify_snapshot(s, ex)
        children = running_children(s, execution_id)
        parent = ex.parent_execution_id if ex.status in Status.TERMINAL else None
    for d in dispatches:
        publish(d)
    notify_transition(execution_id, before, after)
    for child in children:  # the chained pipelines it started stop with it
        abort(child, user=user, rollback=rollback)
    wake_parent(parent)  # a child aborted on its own: its parent's stage fails
    return outcome


def abort_orphans() -> list[str]:
    """Chained executions still going whose parent has ended (the process that aborted the
    parent stopped before aborting its child): aborted now, as the parent's abort would."""
    from sqlalchemy.orm import aliased

    parent = aliased(Execution)
    with session_scope() as s:
        rows = s.exec(
            select(Execution.id, parent.id, parent.status)
            .join(parent, col(Execution.parent_execution_id) == col(parent.id))
            .where(
                col(Execution.status).not_in(list(Status.TERMINAL)),
                col(parent.status).in_(list(Status.TERMINAL)),
            )
        ).all()
    return [
        f"{child}: its parent {of} is {status}: {abort(child, user='the reconciler')}"
        for child, of, status in rows
    ]
