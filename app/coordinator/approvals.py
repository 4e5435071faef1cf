"""Approval stages: the waiting record, who may vote (the users file), the outcome."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, col, select

from app.coordinator.failure import stage_failed
from app.coordinator.publish import Dispatch
from app.definitions.plan import ApprovalStagePlan
from app.errors import ConfigError
from app.models import (
    Execution,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)
from app.settings import get_settings


def approval_record(s: Session, ex: Execution, stage_index: int) -> PhaseRun | None:
    """The stage's approval that waits (an Approval stage's, or an approval step's), else its
    first one."""
    recs = s.exec(
        select(PhaseRun)
        .where(
            PhaseRun.execution_id == ex.id,
            PhaseRun.stage_index == stage_index,
            PhaseRun.kind == "approval",
        )
        .order_by(col(PhaseRun.phase))
    ).all()
    return next((r for r in recs if r.status == Status.RUNNING), recs[0] if recs else None)


def decide_approval_stage(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage_plan: ApprovalStagePlan,
    dispatches: list[Dispatch],
) -> str:
    """An Approval stage: wait (no work in flight) until approved, rejected or timed out.

    Returns what happened, or '' when the stage is approved and the next one may start."""
    rec = approval_record(s, ex, run.stage_index)
    if rec is None:
        spec = stage_plan.approval.spec
        s.add(
            PhaseRun(
                execution_id=ex.id,
                stage_index=run.stage_index,
                phase=0,
                kind="approval",
                hosts=[],
                verdict={
                    "message": spec.approval_message,
                    "groups": spec.approvers.user_groups,
                    "required": spec.approvers.minimum_count,
                    "disallow_executor": spec.approvers.disallow_pipeline_executor,
                    "approvals": [],
                    "rejected_by": None,
                },
            )
        )
        run.status, run.started_at = Status.RUNNING, utcnow()
        ex.status = Status.WAITING
        ex.started_at = ex.started_at or utcnow()
        s.add(run)
        s.add(ex)
        return "waiting for approval"
    if rec.status == Status.RUNNING:
        return "waiting for approval"
    if rec.status == Status.FAILED:
        reason = (rec.verdict or {}).get("reason", "approval failed")
        cls = "ApprovalRejection" if (rec.verdict or {}).get("rejected_by") else "Timeout"
        outcome = stage_failed(s, ex, run, reason, [(None, cls)], rec, dispatches)
        if outcome:
            return outcome
    run.status, run.finished_at = Status.SUCCEEDED, utcnow()
    s.add(run)
    return ""  # the caller (app.coordinator.machine) goes on to the next stage


def approvers(groups: list[str]) -> set[str]:
    import yaml

    path = get_settings().users_file
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            f"cannot read the users file {path} ({exc.strerror}); set VMFARM_USERS_FILE"
        ) from None
    known = data.get("groups") or {}
    missing = [g for g in groups if g not in known]
    if missing:
        raise ConfigError(
            f"user group(s) {', '.join(missing)} are not in {path} "
            f"(groups there: {', '.join(sorted(known)) or 'none'})"
        )
    return {str(u) for g in groups for u in known[g] or []}
