"""Retries: one engine for every retry, whatever its cause.

A failed attempt that its failure strategy retries (``precedence.after_failure``, the one place
that decides) becomes a new attempt **recorded in the ledger first**: a PENDING HostStepRun row,
whose unique idempotency key is also the dispatch record, so a retry is scheduled once however
many times it is asked for. Then it is **published with a countdown** (``app.canvas.
retry_canvas``, through the one publisher). No worker thread sleeps between attempts.

The hosts that wait behind the retried host in its ``maxConcurrency`` lane get PENDING rows too
and run after it in the same chain, so the lane's limit still holds; the task that failed hands
its lane over (its result says ``handover``) and the rest of the old chain passes it along
without running anything.

Gates and the reconciler see a PENDING row as work in flight: a phase is not judged while an
attempt waits, however long the wait. The retry chord's body is the phase's gate, so the phase
is judged once the last attempt has run.

Two causes ask for retries: a step that failed on its worker (``app.execution.step``), and a
step whose worker was lost (the reconciler, ``after_worker_lost``).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from app.canvas import HostStepKey
from app.coordinator.ledger import deployment_stage, record_lost_step
from app.coordinator.precedence import after_failure
from app.coordinator.publish import Dispatch, publish
from app.coordinator.routing import queue_served, tags_of
from app.db import session_scope
from app.definitions.plan import DeploymentStagePlan
from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status, utcnow
from app.settings import get_settings

NOT_RETRIED = "not retried:"


def lane_followers(hosts: list[str], lanes: int | None, host: str) -> list[str]:
    """Hosts after ``host`` in its lane (phase_canvas deals hosts round-robin into lanes)."""
    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    i = hosts.index(host)
    return hosts[i + n :: n]


def schedule_retry(key: HostStepKey, *, wait: float) -> str | None:
    """Record the next attempt of ``key``'s step (and PENDING rows for the hosts that wait behind
    it in its lane), then publish them to run after ``wait`` seconds. Returns what was
    scheduled, or None when that attempt was scheduled already (a repeated request)."""
    settings = get_settings()
    deadline = round(time.time() + wait + settings.dispatch_expires, 3)
    nxt = dataclasses.replace(key, attempt=key.attempt + 1, deadline=deadline)
    now = utcnow()
    with session_scope() as s:
        ex = s.get(Execution, key.execution)
        pr = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == key.execution,
                PhaseRun.stage_index == key.stage,
                PhaseRun.phase == key.phase,
                PhaseRun.kind == key.kind,
            )
        ).first()
        if ex is None or pr is None or ex.status in Status.TERMINAL:
            return None
        stage = deployment_stage(ex, key.stage)
        run = s.exec(
            select(StageRun).where(
                StageRun.execution_id == key.execution, StageRun.stage_index == key.stage
            )
        ).one()
        by_name = {h["name"]: h for h in run.hosts}
        # A follower that has a row other than PENDING has started: it is not handed over.
        claimed = {
            r
            for (r,) in s.execute(
                select(HostStepRun.host).where(
                    HostStepRun.execution_id == key.execution,
                    HostStepRun.stage_index == key.stage,
                    HostStepRun.phase == key.phase,
                    HostStepRun.kind == key.kind,
                    HostStepRun.status != Status.PENDING,
                )
            ).all()
        }
        followers = [
            h
            for h in lane_followers(list(pr.hosts), stage.strategy.max_concurrency, key.host)
            if h not in claimed and h != key.host
        ]
        steps = stage.steps

        def pending(k: HostStepKey) -> HostStepRun:
            # started_at is when the attempt may start; a worker's claim sets the real time.
            return HostStepRun(
                idem_key=k.idem,
                execution_id=k.execution,
                stage_index=k.stage,
                phase=k.phase,
                step_index=k.step,
                step_id=steps[k.step].identifier,
                kind=k.kind,
                host=k.host,
                region=k.region,
                attempt=k.attempt,
                status=Status.PENDING,
                started_at=now,
                heartbeat_at=now,
            )

        try:
            with s.begin_nested():
                s.add(pending(nxt))
        except IntegrityError:
            return None  # scheduled already: this request is a repeat
        known = (
            {
                r
                for (r,) in s.execute(
                    select(HostStepRun.idem_key).where(
                        col(HostStepRun.idem_key).in_(
                            [
                                HostStepKey(
                                    key.execution,
                                    key.stage,
                                    key.phase,
                                    h,
                                    0,
                                    1,
                                    by_name[h]["region"],
                                ).idem
                                for h in followers
                            ]
                        )
                    )
                ).all()
            }
            if followers
            else set()
        )
        for h in followers:
            k = HostStepKey(key.execution, key.stage, key.phase, h, 0, 1, by_name[h]["region"])
            if k.idem not in known:
                s.add(pending(k))
        route = tags_of(stage, [by_name[h] for h in [key.host, *followers]], steps)
    lane = [
        (key.host, key.region, key.step, key.attempt + 1),
        *[(h, by_name[h]["region"], 0, 1) for h in followers],
    ]
    publish(
        Dispatch(
            "retry",
            key.execution,
            key.stage,
            key.phase,
            [(h, r) for h, r, _, _ in lane],
            step_count=len(steps),
            countdown=wait,
            tags_of=route,
            lane=lane,
            deadline=deadline,
        )
    )
    then = f" (then {', '.join(followers)})" if followers else ""
    return f"attempt {key.attempt + 1} of {key.host} in {wait:g} s{then}"


def after_worker_lost(key: HostStepKey) -> str:
    """Apply the failure strategy to a step whose worker was lost (DelegateRestart).

    Retry: a new attempt of that step and the host's later steps, then of the hosts that
    waited behind it in its lane, on the same region queue (another worker takes it).
    Otherwise the hosts behind it in its lane never run: they are recorded as failed."""
    with session_scope() as s:
        ex = s.get(Execution, key.execution)
        pr = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == key.execution,
                PhaseRun.stage_index == key.stage,
                PhaseRun.phase == key.phase,
                PhaseRun.kind == key.kind,
            )
        ).first()
        if ex is None or pr is None or key.kind != "deploy" or ex.status in Status.TERMINAL:
            return "nothing more to do"
        stage = deployment_stage(ex, key.stage)
        run = s.exec(
            select(StageRun).where(
                StageRun.execution_id == key.execution, StageRun.stage_index == key.stage
            )
        ).one()
        regions = {h["name"]: h["region"] for h in run.hosts}
        started = {
            r.host
            for r in s.exec(
                select(HostStepRun).where(
                    HostStepRun.execution_id == key.execution,
                    HostStepRun.stage_index == key.stage,
                    HostStepRun.phase == key.phase,
                    HostStepRun.status != Status.PENDING,
                )
            ).all()
        }
        followers = [
            h
            for h in lane_followers(list(pr.hosts), stage.strategy.max_concurrency, key.host)
            if h not in started
        ]
        decision = after_failure(stage.steps[key.step], stage, "DelegateRestart", key.attempt)
        by_name = {h["name"]: h for h in run.hosts}
        route = tags_of(stage, [by_name[key.host]], stage.steps)
    if decision.wait is not None and not queue_served(
        key.region, route.get((key.host, key.step), ())
    ):
        with session_scope() as s:
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
            row.error = f"{row.error}; {NOT_RETRIED} no live worker consumes vmfarm.{key.region}"
            s.add(row)
    elif decision.wait is not None:
        schedule_retry(key, wait=decision.wait)
        return f"retrying as attempt {key.attempt + 1} on queue vmfarm.{key.region}" + (
            f" (then {', '.join(followers)})" if followers else ""
        )
    for h in followers:
        record_lost_step(
            HostStepKey(key.execution, key.stage, key.phase, h, 0, 1, regions[h]),
            error_class="DelegateRestart",
            error=f"never ran: the worker running its lane (host {key.host}) was lost",
        )
    return "failed (no Retry strategy for DelegateRestart)" + (
        f"; {', '.join(followers)} never ran" if followers else ""
    )


def retry_due(stage: DeploymentStagePlan, row: HostStepRun) -> bool:
    """A step whose worker was lost (DelegateRestart) and whose strategy retries it, in the
    moment between the reconciler recording the loss and recording the retry: not done."""
    if (
        row.status != Status.FAILED
        or row.error_class != "DelegateRestart"
        or row.kind != "deploy"
        or NOT_RETRIED in (row.error or "")
    ):
        return False
    return (
        after_failure(stage.steps[row.step_index], stage, "DelegateRestart", row.attempt).wait
        is not None
    )


def expire_pending(now: Any) -> list[HostStepKey]:
    """PENDING attempts that no worker claimed long after they were due (their message was
    lost, or nobody consumes their queue): recorded as failed (Timeout), so the phase can be
    judged. Returns their keys."""
    settings = get_settings()
    due = now - timedelta(seconds=settings.dispatch_expires + settings.heartbeat_timeout)
    out: list[HostStepKey] = []
    with session_scope() as s:
        for r in s.exec(
            select(HostStepRun).where(
                HostStepRun.status == Status.PENDING, HostStepRun.started_at < due
            )
        ).all():
            r.status, r.error_class, r.finished_at = Status.FAILED, "Timeout", now
            r.error = (
                f"no worker took attempt {r.attempt} within "
                f"{settings.dispatch_expires:g} s of its start time; nothing ran"
            )
            s.add(r)
            out.append(
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
    return out


def cancel_pending(s: Any, execution_id: str, why: str) -> int:
    """Attempts still waiting to start, and hosts stopped at a Wait or approval step, will not
    run (the execution was aborted)."""
    n = 0
    for r in s.exec(
        select(HostStepRun).where(
            HostStepRun.execution_id == execution_id,
            col(HostStepRun.status).in_([Status.PENDING, Status.WAITING]),
        )
    ).all():
        r.status, r.error, r.finished_at = Status.SKIPPED, why, utcnow()
        s.add(r)
        n += 1
    return n
