"""Control tasks: run on ``vmfarm.control`` (gates, nudges). Thin: the coordinator decides."""

from __future__ import annotations

import logging
from typing import Any

from app.celery import app

log = logging.getLogger("vmfarm.tasks")


@app.task(name="vmfarm.verify_gate")
def verify_gate(*, execution_id: str, stage_index: int, phase: int, kind: str = "deploy") -> str:
    """Chord body: record the phase verdict (deploy or rollback) from the ledger, then advance."""
    from app.coordinator import gate

    return gate(execution_id, stage_index, phase, kind=kind)


@app.task(name="vmfarm.verification_gate")
def verification_gate(*, execution_id: str, stage_index: int, phase: int) -> str:
    """Body of a verification chord: the verdict on the phase's checks, then advance."""
    from app.coordinator import verification_gate as judge

    return judge(execution_id, stage_index, phase)


@app.task(name="vmfarm.switch_traffic")
def switch_traffic(*, execution_id: str, stage_index: int, phase: int, kind: str = "switch") -> str:
    """Blue-green: make the phase's hosts the live set, record the outcome, advance."""
    from app.coordinator import record_switch
    from app.execution.checks import do_switch

    ok, result = do_switch(execution_id, stage_index, phase, kind=kind)
    return record_switch(execution_id, stage_index, phase, ok=ok, result=result, kind=kind)


@app.task(name="vmfarm.discovery_done")
def discovery_done(results: list[dict[str, Any]], *, execution_id: str, stage_index: int) -> str:
    """Body of a discovery chord: record the discovered hosts (or the failure), advance."""
    from app.coordinator import discovery_done as record

    return record(execution_id, stage_index, list(results or []))


@app.task(name="vmfarm.notify")
def notify_task(*, execution_id: str, before: dict[str, Any] | None, after: dict[str, Any]) -> int:
    """Send an execution's notifications for one transition (webhooks, email)."""
    from app.coordinator import send_notifications

    return send_notifications(execution_id, before, after)


@app.task(name="vmfarm.reconcile")
def reconcile_task() -> list[str]:
    """Periodic (Celery beat): lost workers and unclaimed work become failures, phases whose
    gate never came are judged from the ledger; advance."""
    from app.coordinator import reconcile

    return reconcile()


@app.task(name="vmfarm.watch_check")
def watch_check(*, execution_id: str, stage_index: int, seq: int) -> str:
    """One check of the watch after deployment: measure, record, judge; the next one is sent
    with a countdown (no worker sleeps through the window)."""
    from app.coordinator import watch_check as check

    return check(execution_id, stage_index, seq)


@app.task(name="vmfarm.advance")
def advance_task(*, execution_id: str) -> str:
    """Advance an execution (idempotent)."""
    from app.coordinator import advance

    return advance(execution_id)


@app.task(name="vmfarm.abort_execution")
def abort_execution(*, execution_id: str, by: str, idem: str) -> str:
    """A host step's failure strategy said Abort: abort the execution here, on control (the
    region worker that saw it may not write executions). Only when the ledger shows that step
    attempt (``idem``) of this execution ended so; idempotent: an ended execution stays."""
    from sqlmodel import select

    from app.coordinator import abort
    from app.db import session_scope
    from app.models import HostStepRun, Status

    with session_scope() as s:
        row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == idem)).first()
        said = (
            row is not None
            and row.execution_id == execution_id
            and row.status == Status.FAILED
            and (row.error or "").endswith("(aborted the execution by the failure strategy)")
        )
    if not said:
        log.warning(
            "execution %s: an abort was asked for step %s, but the ledger does not "
            "show its failure strategy aborting: ignored",
            execution_id,
            idem,
        )
        return "ignored"
    log.info("execution %s: aborting (%s of %s)", execution_id, by, idem)
    return abort(execution_id, user=by)


@app.task(name="vmfarm.nudge")
def nudge(request: Any, exc: Any, traceback: Any, *, execution_id: str) -> None:
    """Error callback of a phase canvas: runs inline on the failing worker, so it only passes
    what it knows to the control queue.

    Its request is either a failed step task (a header task: that host's step failed without
    recording it, e.g. it expired or its worker died) or the chord body (Celery calls the
    errback with the body's request once every header task has finished and one failed).
    """
    task = getattr(request, "task", None)
    kwargs = dict(getattr(request, "kwargs", None) or {})
    payload: dict[str, Any] = {
        "execution_id": execution_id,
        "error": _describe(exc),
        "error_class": _error_class(exc),
    }
    if task in ("vmfarm.run_host", "vmfarm.run_step") and "key" in kwargs:
        payload["key"] = kwargs["key"]
    elif task == "vmfarm.verify_gate":
        payload["phase_done"] = {
            "stage_index": kwargs.get("stage_index"),
            "phase": kwargs.get("phase"),
            "kind": kwargs.get("kind", "deploy"),
        }
    log.warning(
        "execution %s: %s failed (%s); nudging the coordinator",
        execution_id,
        task or "a task",
        payload["error"],
    )
    phase_error.apply_async(kwargs=payload)


@app.task(name="vmfarm.phase_error")
def phase_error(
    *,
    execution_id: str,
    error: str,
    error_class: str,
    key: dict[str, Any] | None = None,
    phase_done: dict[str, Any] | None = None,
) -> str:
    """Record what a nudge reported, then let the coordinator decide (idempotent)."""
    from app.canvas import HostStepKey
    from app.coordinator import advance, gate, record_lost_step

    if key is not None:
        record_lost_step(HostStepKey.from_dict(key), error_class=error_class, error=error)
    if phase_done is not None:
        return gate(
            execution_id,
            int(phase_done["stage_index"]),
            int(phase_done["phase"]),
            kind=str(phase_done.get("kind") or "deploy"),
        )
    return advance(execution_id)


def _describe(exc: Any) -> str:
    from celery.exceptions import ChordError, TaskRevokedError, WorkerLostError

    if isinstance(exc, TaskRevokedError):
        return f"the task was revoked or expired before it ran ({exc})"
    if isinstance(exc, WorkerLostError):
        return f"the worker running the step was lost ({exc})"
    if isinstance(exc, ChordError):
        return f"a step task of the phase failed ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _error_class(exc: Any) -> str:
    from celery.exceptions import TimeoutError as CeleryTimeout
    from celery.exceptions import WorkerLostError

    if isinstance(exc, WorkerLostError):
        return "DelegateRestart"
    if isinstance(exc, CeleryTimeout):
        return "Timeout"
    return str(getattr(exc, "error_class", "Unknown"))
