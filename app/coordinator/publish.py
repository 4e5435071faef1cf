"""The only publisher: every canvas and timer the coordinator sends goes through ``publish``,
after the transaction that recorded it has committed (a task must never run before its rows
are visible); ``ask`` sends tasks that record nothing and waits for their answers (``vmfarm
hosts``). The canvases themselves are built in ``app.canvas``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from app import canvas
from app.settings import get_settings

log = logging.getLogger("vmfarm.coordinator")


@dataclass
class Dispatch:
    """Something to publish after the commit: one phase's deploy, verify or switch canvas."""

    kind: str
    execution_id: str
    stage_index: int
    phase: int
    hosts: list[tuple[str, str]]
    step_count: int = 0
    lanes: int | None = None
    steps_of: dict[str, tuple[int, tuple[str, int] | None]] | None = None
    countdown: float = 0.0
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None
    discover: list[tuple[dict[str, Any], str, tuple[str, ...]]] | None = None
    # A retry or a resend: one lane of (host, region, first step, attempt), and its dispatch
    # deadline.
    lane: list[tuple[str, str, int, int]] | None = None
    deadline: float | None = None
    # Hosts going on after a Wait or approval step: the first step they run.
    first_step: int = 0


def _canvas(d: Dispatch) -> Any:
    """The signature ``d`` describes, built now (dispatch deadlines count from now)."""
    expires = get_settings().dispatch_expires
    if d.kind == "timer":
        return canvas.advance_later(execution_id=d.execution_id)
    if d.kind == "watch":  # a check of the watch after deployment; ``phase`` is its number
        return canvas.watch_check(
            execution_id=d.execution_id, stage_index=d.stage_index, seq=d.phase
        )
    if d.kind in ("deploy", "rollback"):
        sig = canvas.phase_canvas(
            execution_id=d.execution_id,
            stage_index=d.stage_index,
            phase=d.phase,
            hosts=d.hosts,
            step_count=d.step_count,
            expires=expires,
            lanes=d.lanes,
            kind=d.kind,
            steps_of=d.steps_of,
            tags_of=d.tags_of,
        )
    elif d.kind in ("retry", "resend"):  # resend: a lane whose message the broker lost
        sig = canvas.retry_canvas(
            execution_id=d.execution_id,
            stage_index=d.stage_index,
            phase=d.phase,
            lane=d.lane or [],
            step_count=d.step_count,
            deadline=d.deadline or 0.0,
            countdown=d.countdown,
            tags_of=d.tags_of,
        )
    elif d.kind == "resume":
        sig = canvas.resume_canvas(
            execution_id=d.execution_id,
            stage_index=d.stage_index,
            phase=d.phase,
            hosts=d.hosts,
            first_step=d.first_step,
            step_count=d.step_count,
            deadline=d.deadline or 0.0,
            lanes=d.lanes,
            tags_of=d.tags_of,
        )
    elif d.kind == "verify":
        sig = canvas.verify_canvas(
            execution_id=d.execution_id,
            stage_index=d.stage_index,
            phase=d.phase,
            hosts=d.hosts,
            expires=expires,
            tags_of=d.tags_of,
            countdown=d.countdown,
        )
    elif d.kind == "discover":
        sig = canvas.discovery_canvas(
            execution_id=d.execution_id, stage_index=d.stage_index, work=d.discover or []
        )
    else:
        sig = canvas.switch_canvas(
            execution_id=d.execution_id, stage_index=d.stage_index, phase=d.phase, kind=d.kind
        )
    return sig


def publish(d: Dispatch) -> None:
    """Send what ``d`` describes (call after the commit that recorded it).

    A canvas goes out in a few Redis round trips (``app.celery.batched``: pipelines of a few
    hundred messages, no result subscriptions)."""
    from app.celery import batched

    if d.kind in ("timer", "watch"):
        _canvas(d).apply_async(countdown=d.countdown)
        return
    with batched():
        _canvas(d).apply_async()
    log.info(
        "execution %s: published %s of stage %d phase %d (%d hosts)",
        d.execution_id,
        d.kind,
        d.stage_index,
        d.phase,
        len(d.hosts),
    )


def request_abort(execution_id: str, *, by: str, idem: str) -> None:
    """Ask the control worker to abort an execution (a region worker's failure strategy said
    Abort for the step attempt ``idem``; its role may not write executions)."""
    canvas.task("vmfarm.abort_execution", execution_id=execution_id, by=by, idem=idem).apply_async()


def publish_notifications(
    execution_id: str, before: dict[str, Any] | None, after: dict[str, Any]
) -> None:
    """Hand a transition's notifications to a control task (a slow webhook never holds up
    the coordinator)."""
    canvas.notify(execution_id=execution_id, before=before, after=after).apply_async()


NO_ANSWER = object()  # what ``ask`` returns for a task no worker answered in time


def ask(signatures: list[Any], *, timeout: float) -> list[Any]:
    """Send tasks that record nothing (expiring after ``timeout`` seconds) and return their
    results in order: a value, the exception a task raised, or ``NO_ANSWER``."""
    import time

    from celery import group
    from celery.exceptions import TimeoutError as NoAnswer

    result = group(signatures).apply_async(expires=timeout)
    deadline = time.monotonic() + timeout
    answers: list[Any] = []
    for child in result.results:
        try:
            answers.append(
                child.get(
                    timeout=max(0.1, deadline - time.monotonic()),
                    propagate=False,
                    disable_sync_subtasks=False,
                )
            )
        except NoAnswer:
            answers.append(NO_ANSWER)
        child.forget()
    return answers
