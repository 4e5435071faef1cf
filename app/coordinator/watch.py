"""The watch after deployment (a stage's ``rollbackStrategy.triggers``): after the stage's last
phase passed, its hosts are watched for the triggers' window before the stage succeeds.

The watch is one PhaseRun (kind ``watch``, phase -1) that stays RUNNING for the window; its
verdict holds the window, every check's numbers and the verdict so far, so ``vmfarm status``
shows it live. No worker sleeps: each check is a control task published with a countdown
(``vmfarm.watch_check``), which measures outside the execution's lock, records under it and
publishes the next one after the commit. A check carries the sequence number it was sent
with; one that is not the record's current number is a stale duplicate and does nothing. The
reconciler sends a new check (a new number) when the next one is long overdue (a lost message
or a control worker that died).

A breach fails the record, and the coordinator rolls the stage back as a StageRollback does
(the ledger's rollback: rollbackSteps, or the previous version's steps), with the trigger and
its numbers as the error. A passed watch lets the stage succeed.
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import Session, select

from app.coordinator.ledger import deployment_stage, stage_run
from app.coordinator.publish import Dispatch
from app.coordinator.rollback import begin_rollback
from app.definitions.plan import DeploymentStagePlan
from app.models import Execution, PhaseRun, StageRun, Status, utcnow
from app.settings import get_settings

WATCH_PHASE = -1
#: How late a check may be before the reconciler sends another (beyond its interval).
OVERDUE_GRACE = 60.0


def watch_record(s: Session, execution_id: str, stage_index: int) -> PhaseRun | None:
    """The stage's watch record, if its watch has started."""
    return s.exec(
        select(PhaseRun).where(
            PhaseRun.execution_id == execution_id,
            PhaseRun.stage_index == stage_index,
            PhaseRun.phase == WATCH_PHASE,
            PhaseRun.kind == "watch",
        )
    ).first()


def _deployed(run: StageRun) -> list[str]:
    return [n for ph in run.phases if ph.get("kind", "deploy") == "deploy" for n in ph["hosts"]]


def decide_watch(
    s: Session,
    ex: Execution,
    run: StageRun,
    stage_plan: DeploymentStagePlan,
    dispatches: list[Dispatch],
) -> str | None:
    """Start, wait for, or act on the stage's watch; None when the stage may succeed (no
    watch, or it passed), else what the coordinator did."""
    spec = stage_plan.watch
    if spec is None:
        return None
    rec = watch_record(s, ex.id, run.stage_index)
    if rec is None:
        now = time.time()
        window = spec.window_seconds()
        rec = PhaseRun(
            execution_id=ex.id,
            stage_index=run.stage_index,
            phase=WATCH_PHASE,
            kind="watch",
            hosts=_deployed(run),
            verdict={
                "state": "watching",
                "started": round(now, 3),
                "ends": round(now + window, 3),
                "window": window,
                "interval": spec.interval_seconds(),
                "lookback": spec.lookback_seconds(),
                "prometheus": spec.prometheus_url or get_settings().prometheus_url,
                "seq": 1,
                "due": round(now + min(spec.interval_seconds(), window), 3),
                "checks": 0,
                "samples": [],
                "triggers": [
                    {"name": t.name, "condition": t.condition, "window": t.window_seconds()}
                    for t in spec.triggers
                ],
                "reasons": [],
            },
        )
        s.add(rec)
        s.flush()  # the unique (execution, stage, phase, kind) row
        dispatches.append(
            Dispatch(
                "watch",
                ex.id,
                run.stage_index,
                1,  # the check's sequence number
                [],
                countdown=min(spec.interval_seconds(), window),
            )
        )
        return f"watching stage {run.identifier} for {window:g}s"
    if rec.status == Status.RUNNING:
        return "watching"
    if rec.status == Status.FAILED:
        v = rec.verdict or {}
        error = "the watch after deployment: " + "; ".join(v.get("reasons") or ["breached"])
        return begin_rollback(
            s, ex, run, error, scope="StageRollback", cause="watch", dispatches=dispatches
        )
    return None


def watch_inputs(
    s: Session, execution_id: str, stage_index: int, seq: int
) -> dict[str, Any] | None:
    """What a check needs, read without the lock (None: nothing to check: the watch ended,
    or this check is a stale duplicate)."""
    from app.definitions.expressions import render
    from app.providers.base import Host
    from app.units import host_context

    ex = s.get(Execution, execution_id)
    if ex is None or ex.status in Status.TERMINAL:
        return None
    rec = watch_record(s, execution_id, stage_index)
    if rec is None or rec.status != Status.RUNNING or (rec.verdict or {}).get("seq") != seq:
        return None
    stage = deployment_stage(ex, stage_index)
    spec = stage.watch
    if spec is None:
        return None
    run = stage_run(s, ex, stage_index)
    by_name = {h["name"]: Host.from_dict(h) for h in run.hosts}
    names = [n for n in rec.hosts if n in by_name]
    hc = spec.health_check
    return {
        "spec": spec,
        "url": (rec.verdict or {}).get("prometheus"),
        "started": float((rec.verdict or {})["started"]),
        "instances": [render(spec.instance, host_context(by_name[n], stage)) for n in names],
        "health_urls": {n: render(hc.url, host_context(by_name[n], stage)) for n in names}
        if hc is not None
        else {},
    }


def record_check(
    s: Session, rec: PhaseRun, sample: dict[str, Any], *, now: float
) -> tuple[str, float | None]:
    """Add one check's numbers to the watch record and judge; (state, countdown to the next
    check or None when the watch ended). Call under the execution's lock."""
    from app.verify.watch import HISTORY, judge, next_check

    ex = s.get(Execution, rec.execution_id)
    assert ex is not None
    spec = deployment_stage(ex, rec.stage_index).watch
    assert spec is not None
    v = dict(rec.verdict or {})
    started = float(v["started"])
    samples = [*(v.get("samples") or []), sample][-HISTORY:]
    verdict = judge(spec, samples, started=started, now=now)
    v.update(
        samples=samples,
        checks=int(v.get("checks") or 0) + 1,
        last=sample,
        state=verdict["state"],
        triggers=verdict["triggers"],
        reasons=verdict["reasons"],
        checked_at=round(now, 3),
    )
    wait: float | None = None
    if verdict["state"] == "breached":
        v["passed"] = False
        rec.status, rec.gate_at = Status.FAILED, utcnow()
    elif verdict["state"] == "passed":
        v["passed"] = True
        rec.status, rec.gate_at = Status.SUCCEEDED, utcnow()
    else:
        wait = next_check(spec, started=started, now=now)
        v["seq"] = int(v.get("seq") or 0) + 1
        v["due"] = round(now + wait, 3)
    rec.verdict = v
    s.add(rec)
    return verdict["state"], wait


def overdue_watches(s: Session, *, now: float) -> list[tuple[str, int, int]]:
    """Watches whose next check is long overdue (its message lost, or the control worker
    died): each gets a new sequence number, and the caller sends that check (execution,
    stage, seq) after the commit."""
    out: list[tuple[str, int, int]] = []
    for rec in s.exec(
        select(PhaseRun).where(PhaseRun.kind == "watch", PhaseRun.status == Status.RUNNING)
    ).all():
        v = dict(rec.verdict or {})
        ex = s.get(Execution, rec.execution_id)
        if ex is None or ex.status in Status.TERMINAL:  # aborted while watching
            v.update(
                state="ended", reasons=[f"the execution ended ({ex.status if ex else 'gone'})"]
            )
            rec.verdict, rec.status, rec.gate_at = v, Status.ABORTED, utcnow()
            s.add(rec)
            continue
        due = float(v.get("due") or 0)
        if now > due + float(v.get("interval") or 0) + OVERDUE_GRACE:
            v["seq"] = int(v.get("seq") or 0) + 1
            v["due"] = round(now, 3)
            v["resent"] = int(v.get("resent") or 0) + 1
            rec.verdict = v
            s.add(rec)
            out.append((rec.execution_id, rec.stage_index, int(v["seq"])))
    return out
