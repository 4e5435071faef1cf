"""Wait and HarnessApproval steps among a stage's steps: barriers the coordinator carries out.

A host's task stops at such a step: its row says WAITING and the worker goes on with other
work (app.execution.step). Once every host of the phase has stopped there (or failed before
it), the coordinator decides, under the execution's lock:

- Wait: when ``duration`` has passed since the first host reached it, the hosts go on. Until
  then a timer (a task with a countdown, the way retries wait) wakes the coordinator; the
  reconciler wakes it too if that timer is lost. No worker sleeps.
- HarnessApproval: an approval record (a PhaseRun of kind ``approval``) and the execution
  WAITING, as for an Approval stage: ``vmfarm approve`` / ``reject`` answer it, the reconciler
  times it out. Approved, the hosts go on; rejected or timed out, their rows fail
  (ApprovalRejection or Timeout) and the phase's verdict and failure strategies follow.

Going on is a new canvas for the phase's waiting hosts from the step after the barrier
(``app.canvas.resume_canvas``), its rows recorded PENDING first (the retry engine's way), so
it is sent once however many times the coordinator is asked.
"""

from __future__ import annotations

import time
from datetime import timedelta

from sqlmodel import Session, select

from app.coordinator.ledger import stage_data
from app.coordinator.publish import Dispatch
from app.coordinator.routing import tags_of
from app.definitions.base import parse_duration
from app.definitions.plan import ApprovalStepPlan, DeploymentStagePlan, WaitStepPlan
from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status, utcnow
from app.settings import get_settings


def approval_phase(phase: int, step: int) -> int:
    """The phase number of the approval record of ``step`` in ``phase`` (Approval stages use
    0; these never collide with it)."""
    return (phase + 1) * 1000 + step


def decide_barrier(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage: DeploymentStagePlan,
    pr: PhaseRun,
    dispatches: list[Dispatch],
) -> str | None:
    """What the phase's hosts stopped at a barrier wait for: a message while they wait (or
    once they were sent on), None when rows changed and the phase may be judged now."""
    rows = s.exec(
        select(HostStepRun).where(
            HostStepRun.execution_id == ex.id,
            HostStepRun.stage_index == run.stage_index,
            HostStepRun.phase == pr.phase,
            HostStepRun.kind == "deploy",
        )
    ).all()
    latest: dict[tuple[str, int], HostStepRun] = {}
    for r in rows:
        cur = latest.get((r.host, r.step_index))
        if cur is None or r.attempt > cur.attempt:
            latest[(r.host, r.step_index)] = r
    if any(r.status in (Status.RUNNING, Status.PENDING) for r in latest.values()):
        return "waiting"
    waiting = [r for r in latest.values() if r.status == Status.WAITING]
    if not waiting:
        return "waiting"
    stopped = {r.host for r in waiting}
    failed = {r.host for r in latest.values() if r.status == Status.FAILED}
    if any(h not in stopped | failed for h in pr.hosts):
        return "waiting"  # a host has not reached the barrier yet (its task has not run)
    index = min(r.step_index for r in waiting)
    step = stage.steps[index]
    at = [r for r in waiting if r.step_index == index]
    if isinstance(step, WaitStepPlan):
        due = min(r.started_at for r in at) + timedelta(seconds=parse_duration(step.spec.duration))
        now = utcnow()
        if now < due:
            if _timer_once(s, pr, index):
                dispatches.append(
                    Dispatch(
                        "timer",
                        ex.id,
                        run.stage_index,
                        pr.phase,
                        [],
                        countdown=(due - now).total_seconds() + 0.05,
                    )
                )
            return f"waiting until {due:%H:%M:%S} UTC (Wait step '{step.identifier}')"
        return _go_on(
            s, ex, run, stage, pr, at, index, dispatches, note=f"waited {step.spec.duration}"
        )
    if isinstance(step, ApprovalStepPlan):
        rec = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == ex.id,
                PhaseRun.stage_index == run.stage_index,
                PhaseRun.phase == approval_phase(pr.phase, index),
                PhaseRun.kind == "approval",
            )
        ).first()
        if rec is None:
            spec = step.spec
            s.add(
                PhaseRun(
                    execution_id=ex.id,
                    stage_index=run.stage_index,
                    phase=approval_phase(pr.phase, index),
                    kind="approval",
                    hosts=sorted(stopped),
                    verdict={
                        "message": spec.approval_message,
                        "groups": spec.approvers.user_groups,
                        "required": spec.approvers.minimum_count,
                        "disallow_executor": spec.approvers.disallow_pipeline_executor,
                        "timeout": step.timeout or "1d",
                        "step": step.identifier,
                        "approvals": [],
                        "rejected_by": None,
                    },
                )
            )
            ex.status = Status.WAITING
            s.add(ex)
            return "waiting for approval"
        if rec.status == Status.RUNNING:
            return "waiting for approval"
        if rec.status == Status.SUCCEEDED:
            who = ", ".join(a["user"] for a in (rec.verdict or {}).get("approvals", []))
            return _go_on(s, ex, run, stage, pr, at, index, dispatches, note=f"approved by {who}")
        verdict = rec.verdict or {}
        cls = "ApprovalRejection" if verdict.get("rejected_by") else "Timeout"
        now = utcnow()
        reason = str(verdict.get("reason") or "approval failed")
        for r in at:
            r.status, r.error_class, r.finished_at = Status.FAILED, cls, now
            r.failed_unit, r.error = step.identifier, reason
            s.add(r)
        # The phase's failure names it (its verdict keeps what is there).
        pr.verdict = {**(pr.verdict or {}), "reasons": [f"step '{step.identifier}': {reason}"]}
        s.add(pr)
        return None
    return "waiting"


def _timer_once(s: Session, pr: PhaseRun, index: int) -> bool:
    """Note in the phase's record that the timer of the Wait at ``index`` was sent (the
    execution is locked); False when it was already."""
    verdict = dict(pr.verdict or {})
    sent = list(verdict.get("timers") or [])
    if index in sent:
        return False
    verdict["timers"] = [*sent, index]
    pr.verdict = verdict
    s.add(pr)
    return True


def _go_on(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage: DeploymentStagePlan,
    pr: PhaseRun,
    at: list[HostStepRun],
    index: int,
    dispatches: list[Dispatch],
    *,
    note: str,
) -> str | None:
    """The barrier is passed: its rows succeed, and the hosts run their later steps."""
    now = utcnow()
    for r in at:
        r.status, r.finished_at, r.exit_code = Status.SUCCEEDED, now, 0
        r.stdout_tail = ((r.stdout_tail or "") + f"{note}\n")[-4000:]
        s.add(r)
    nxt = index + 1
    if nxt >= len(stage.steps):
        return None  # that was the last step: the phase is judged now
    by_name = stage_data(s, ex, run).by_name
    order = [h for h in pr.hosts if h in {r.host for r in at}]
    step_id = stage.steps[nxt].identifier
    deadline = round(time.time() + get_settings().dispatch_expires, 3)
    for h in order:
        s.add(
            HostStepRun(
                idem_key=f"{ex.id}:{run.stage_index}:{pr.phase}:{h}:{nxt}:1",
                execution_id=ex.id,
                stage_index=run.stage_index,
                phase=pr.phase,
                step_index=nxt,
                step_id=step_id,
                kind="deploy",
                host=h,
                region=by_name[h]["region"],
                attempt=1,
                status=Status.PENDING,
                started_at=now,
                heartbeat_at=now,
            )
        )
    s.flush()  # the unique idempotency keys: a second resume fails here, before any send
    dispatches.append(
        Dispatch(
            "resume",
            ex.id,
            run.stage_index,
            pr.phase,
            [(h, by_name[h]["region"]) for h in order],
            step_count=len(stage.steps),
            lanes=stage.strategy.max_concurrency,
            first_step=nxt,
            deadline=deadline,
            tags_of=tags_of(stage, [by_name[h] for h in order], stage.steps),
        )
    )
    return f"{note}; {len(order)} host(s) go on from step '{step_id}'"
