"""The reconciler: what error callbacks miss (design note §3). Steps whose worker stopped
renewing their heartbeat, dispatched work no worker took, approvals past their timeout, and
phases whose gate never came; then the coordinator decides.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from app.canvas import HostStepKey
from app.coordinator.ledger import lock_execution, record_lost_step, stage_of, step_identifier
from app.coordinator.machine import advance
from app.coordinator.resend import resend_lost
from app.coordinator.retry import after_worker_lost, expire_pending
from app.coordinator.verdicts import evaluate_phase
from app.coordinator.watch import overdue_watches
from app.db import session_scope
from app.definitions.base import parse_duration
from app.definitions.plan import ApprovalStagePlan
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
    utcnow,
)
from app.settings import get_settings

log = logging.getLogger("vmfarm.coordinator")


def reconcile(*, now: Any = None) -> list[str]:
    """Catch what error callbacks miss (design note §3): steps whose worker stopped renewing
    their heartbeat, and dispatched work that no worker took; then let the coordinator decide.

    Safe to run any number of times, from Celery beat and from `vmfarm reconcile`.
    """
    from datetime import timedelta

    settings = get_settings()
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.heartbeat_timeout)
    unclaimed = now - timedelta(seconds=settings.dispatch_expires + settings.heartbeat_timeout)
    actions: list[str] = []
    touched: set[str] = set()
    lost: list[HostStepKey] = []
    with session_scope() as s:
        for r in s.exec(
            select(HostStepRun).where(
                HostStepRun.status == Status.RUNNING, HostStepRun.heartbeat_at < stale
            )
        ).all():
            r.status, r.error_class = Status.FAILED, "DelegateRestart"
            r.error = (
                f"worker lost: no heartbeat from {r.worker or 'its worker'} since "
                f"{r.heartbeat_at:%H:%M:%S} UTC (timeout {settings.heartbeat_timeout:g} s)"
            )
            r.finished_at = now
            if not r.step_id:  # claimed, never finished: name its step from the plan
                owner = s.get(Execution, r.execution_id)
                r.step_id = (
                    step_identifier(
                        owner,
                        HostStepKey(
                            r.execution_id,
                            r.stage_index,
                            r.phase,
                            r.host,
                            r.step_index,
                            r.attempt,
                            r.region,
                            kind=r.kind,
                        ),
                    )
                    if owner
                    else ""
                )
            s.add(r)
            touched.add(r.execution_id)
            lost.append(
                HostStepKey(
                    r.execution_id,
                    r.stage_index,
                    r.phase,
                    r.host,
                    r.step_index,
                    r.attempt,
                    r.region,
                    kind=r.kind,
                )
            )
            actions.append(f"{r.execution_id}: {r.host} step {r.step_id}: worker lost")
        for pr in s.exec(
            select(PhaseRun).where(PhaseRun.status == Status.RUNNING, PhaseRun.kind == "approval")
        ).all():
            ex = s.get(Execution, pr.execution_id)
            stage = stage_of(ex, pr.stage_index) if ex else None
            timeout = (
                (pr.verdict or {}).get("timeout")
                or (stage.approval.timeout if isinstance(stage, ApprovalStagePlan) else None)
                or "1d"
            )
            limit = parse_duration(timeout)
            if ex is not None and pr.dispatched_at < now - timedelta(seconds=limit):
                pr.status, pr.gate_at = Status.FAILED, now
                pr.verdict = {**(pr.verdict or {}), "reason": f"approval timed out after {timeout}"}
                ex.status = Status.RUNNING
                s.add(pr)
                s.add(ex)
                touched.add(ex.id)
                actions.append(f"{ex.id}: approval timed out")
        # Discovery that no worker answered: the stage fails instead of waiting forever.
        for pr in s.exec(
            select(PhaseRun).where(
                PhaseRun.status == Status.RUNNING,
                PhaseRun.kind == "discover",
                PhaseRun.dispatched_at < unclaimed,
            )
        ).all():
            where = ", ".join(
                f"vmfarm.{i['region']}" for i in (pr.verdict or {}).get("infrastructures", [])
            )
            pr.status, pr.gate_at = Status.FAILED, now
            pr.verdict = {
                **(pr.verdict or {}),
                "error_class": "Timeout",
                "error": f"no worker listed the hosts within "
                f"{settings.dispatch_expires:g} s (queues: {where})",
            }
            s.add(pr)
            touched.add(pr.execution_id)
            actions.append(f"{pr.execution_id}: host discovery timed out")
        # Hosts stopped at a Wait step (its timer may be lost) or a decided approval step.
        touched.update(
            r
            for (r,) in s.execute(
                select(HostStepRun.execution_id)
                .where(HostStepRun.status == Status.WAITING)
                .distinct()
            ).all()
        )
        # Manual interventions whose post-timeout action is due (advance applies it).
        touched.update(
            pr.execution_id
            for pr in s.exec(
                select(PhaseRun).where(
                    PhaseRun.status == Status.RUNNING, col(PhaseRun.kind).startswith("mi-")
                )
            ).all()
        )
        # Rolling back after an abort waits for running steps; they may end without a gate.
        touched.update(
            e.id
            for e in s.exec(select(Execution).where(Execution.status == Status.ROLLING_BACK)).all()
        )
        # So does an iteration of a looped stage rolling back alone (its execution RUNNING).
        touched.update(
            r
            for (r,) in s.execute(
                select(StageRun.execution_id)
                .where(StageRun.status == Status.ROLLING_BACK)
                .distinct()
            ).all()
        )
        waiting = {
            pr.execution_id
            for pr in s.exec(
                select(PhaseRun).where(
                    PhaseRun.status == Status.RUNNING,
                    PhaseRun.kind == "deploy",
                    PhaseRun.dispatched_at < unclaimed,
                )
            ).all()
        }
        # A parent whose chained child ended while nothing woke it (the process that ended
        # the child stopped before its wake_parent).
        child = aliased(Execution)
        touched.update(
            s.exec(
                select(Execution.id)
                .join(child, col(child.parent_execution_id) == col(Execution.id))
                .where(
                    col(Execution.status).not_in(list(Status.TERMINAL)),
                    col(child.status).in_(list(Status.TERMINAL)),
                    col(child.finished_at) < stale,
                )
                .distinct()
            ).all()
        )
        # An execution whose submitter died between recording it and dispatching it.
        touched.update(
            e.id
            for e in s.exec(
                select(Execution).where(
                    Execution.status == Status.QUEUED, Execution.created_at < stale
                )
            ).all()
        )
    for key in lost:
        actions.append(
            f"{key.execution}: {key.host} step {key.step}: worker lost; {after_worker_lost(key)}"
        )
    actions.extend(resend_lost(now))  # before the dispatch expiry: a lost message goes again
    actions.extend(_resend_watch_checks())
    for ex_id, host, first_step in _unclaimed_hosts(waiting, unclaimed):
        record_lost_step(
            first_step,
            error_class="Timeout",
            error=f"no worker took the steps of {host} within "
            f"{settings.dispatch_expires:g} s; nothing ran",
        )
        touched.add(ex_id)
        actions.append(f"{ex_id}: {host}: no worker took its steps")
    for key in expire_pending(now):
        touched.add(key.execution)
        actions.append(
            f"{key.execution}: {key.host} step {key.step} attempt {key.attempt}: no worker took it"
        )
    for ex_id in sorted(touched):
        with session_scope() as s:
            ex = lock_execution(s, ex_id)
            if ex is None or ex.status in Status.TERMINAL:
                continue
            for pr in s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id,
                    PhaseRun.status == Status.RUNNING,
                    col(PhaseRun.kind).in_(["deploy", "rollback"]),
                )
            ).all():
                run = s.exec(
                    select(StageRun).where(
                        StageRun.execution_id == ex_id, StageRun.stage_index == pr.stage_index
                    )
                ).one()
                evaluate_phase(s, ex, run, pr, gate=False)
        actions.append(f"{ex_id}: {advance(ex_id)}")
    return actions + _judge_lost_gates(now)


def _resend_watch_checks() -> list[str]:
    """A watch after deployment whose next check is long overdue gets a new one."""
    import time

    from app.coordinator.publish import Dispatch, publish

    with session_scope() as s:
        overdue = overdue_watches(s, now=time.time())
    for ex_id, stage_index, seq in overdue:  # after the commit
        publish(Dispatch("watch", ex_id, stage_index, seq, []))
    return [
        f"{ex_id}: stage {si}: the watch's check was overdue; sent again"
        for ex_id, si, _ in overdue
    ]


def _judge_lost_gates(now: Any) -> list[str]:
    """Judge deploy and rollback phases whose hosts have all finished but whose gate never ran.

    A phase's gate is its chord's body, and the chord's counters live in the result backend:
    a Redis restarted without persistence (or flushed) forgets them, the last header task then
    finds no chord to complete and the body is never sent. Once no step of such a phase has
    run for ``heartbeat_timeout`` seconds, the phase is judged from the ledger as the gate
    would have judged it, and the execution advances. A phase with a host that has not
    finished is left alone (its work may still sit in a queue: the reconciler's dispatch
    expiry covers that). Idempotent, and harmless next to a late gate: both lock the
    execution and only a RUNNING phase is judged.
    """
    quiet_for = get_settings().heartbeat_timeout
    quiet = now - timedelta(seconds=quiet_for)
    found: list[tuple[str, int, int, str]] = []
    with session_scope() as s:
        for pr in s.exec(
            select(PhaseRun).where(
                PhaseRun.status == Status.RUNNING,
                col(PhaseRun.kind).in_(["deploy", "rollback"]),
                PhaseRun.dispatched_at < quiet,
            )
        ).all():
            running, last = s.exec(
                select(
                    func.count().filter(
                        col(HostStepRun.status).in_([Status.RUNNING, Status.PENDING])
                    ),
                    func.max(HostStepRun.finished_at),
                ).where(
                    HostStepRun.execution_id == pr.execution_id,
                    HostStepRun.stage_index == pr.stage_index,
                    HostStepRun.phase == pr.phase,
                    HostStepRun.kind == ("rollback" if pr.kind == "rollback" else "deploy"),
                )
            ).one()
            if not running and last is not None and last < quiet:
                found.append((pr.execution_id, pr.stage_index, pr.phase, pr.kind))
    actions: list[str] = []
    for ex_id, stage_index, phase, kind in found:
        with session_scope() as s:
            ex = lock_execution(s, ex_id)
            record = s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id,
                    PhaseRun.stage_index == stage_index,
                    PhaseRun.phase == phase,
                    PhaseRun.kind == kind,
                )
            ).first()
            if (
                ex is None
                or ex.status in Status.TERMINAL
                or record is None
                or record.status != Status.RUNNING
            ):
                continue
            run = s.exec(
                select(StageRun).where(
                    StageRun.execution_id == ex_id, StageRun.stage_index == stage_index
                )
            ).one()
            if not evaluate_phase(s, ex, run, record, gate=False):
                continue  # a host has not finished: not a lost gate
            record.verdict = {
                **(record.verdict or {}),
                "judged_by": (
                    f"the reconciler: every host had finished for {quiet_for:g} s and the gate "
                    "never ran (its chord state was lost from the result backend?)"
                ),
            }
            s.add(record)
        log.warning(
            "execution %s: %s phase %d of stage %d had no gate; judged from the ledger",
            ex_id,
            kind,
            phase,
            stage_index,
        )
        actions.append(
            f"{ex_id}: stage {stage_index} {kind} phase {phase}: every host "
            f"finished and no gate came; judged from the ledger; {advance(ex_id)}"
        )
    return actions


def _unclaimed_hosts(execution_ids: set[str], before: Any) -> list[tuple[str, str, HostStepKey]]:
    """(execution, host, key of its first step) for hosts of long-dispatched phases with no
    row at all: their messages sit in a queue nobody consumes."""
    out = []
    with session_scope() as s:
        for ex_id in execution_ids:
            for pr in s.exec(
                select(PhaseRun).where(
                    PhaseRun.execution_id == ex_id,
                    PhaseRun.status == Status.RUNNING,
                    PhaseRun.kind == "deploy",
                    PhaseRun.dispatched_at < before,
                )
            ).all():
                run = s.exec(
                    select(StageRun).where(
                        StageRun.execution_id == ex_id, StageRun.stage_index == pr.stage_index
                    )
                ).one()
                regions = {h["name"]: h["region"] for h in run.hosts}
                seen = {
                    r.host
                    for r in s.exec(
                        select(HostStepRun).where(
                            HostStepRun.execution_id == ex_id,
                            HostStepRun.stage_index == pr.stage_index,
                            HostStepRun.phase == pr.phase,
                        )
                    ).all()
                }
                for host in pr.hosts:
                    if host not in seen:
                        out.append(
                            (
                                ex_id,
                                host,
                                HostStepKey(
                                    ex_id, pr.stage_index, pr.phase, host, 0, 1, regions[host]
                                ),
                            )
                        )
    return out
