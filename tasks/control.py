"""Control tasks: run on ``vmfarm.control`` (gates, nudges). Thin: the coordinator decides."""

from __future__ import annotations

import logging
from typing import Any

from app.celery import app

log = logging.getLogger("vmfarm.tasks")


@app.task(name="vmfarm.verify_gate")
def verify_gate(*, execution_id: str, stage_index: int, phase: int) -> str:
    """Chord body: record the phase verdict from the ledger, then advance the execution."""
    from app.coordinator import gate

    return gate(execution_id, stage_index, phase)


@app.task(name="vmfarm.advance")
def advance_task(*, execution_id: str) -> str:
    """Advance an execution (idempotent)."""
    from app.coordinator import advance

    return advance(execution_id)


@app.task(name="vmfarm.nudge")
def nudge(request: Any, exc: Any, traceback: Any, *, execution_id: str) -> None:
    """Error callback: runs inline on the failing worker, so it only asks control to advance."""
    log.warning("execution %s: a task failed (%r); nudging the coordinator", execution_id, exc)
    advance_task.apply_async(kwargs={"execution_id": execution_id})
