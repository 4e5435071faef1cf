"""Region tasks: run on ``vmfarm.<region>`` workers (threads pool), do the SSH work."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.canvas import HostStepKey
from app.celery import app


@app.task(name="vmfarm.run_step", bind=True)
def run_step(
    self: Any, prev: dict[str, Any] | None = None, *, key: dict[str, Any]
) -> dict[str, Any]:
    """Run one step on one host. ``prev`` is the host's previous step result (chain link)."""
    from app.execution.step import execute

    if prev is not None and prev.get("handover"):
        return prev  # a retry took this lane over
    if prev is not None and _stopped(prev, key):
        return prev
    req = self.request
    queue = (req.delivery_info or {}).get("routing_key")
    return execute(
        HostStepKey.from_dict(key), prev=prev, task_id=req.id, worker=req.hostname, queue=queue
    )


@app.task(name="vmfarm.run_host", bind=True)
def run_host(
    self: Any, prev: dict[str, Any] | None = None, *, key: dict[str, Any], until: int
) -> dict[str, Any]:
    """Run steps ``key.step`` .. ``until - 1`` of one host, in order, in this one task.

    Each step is what a ``run_step`` task would be: its own ledger row and idempotency key, its
    failure strategy, skipped after a failed step. The dispatch deadline applies to the first
    step only: it bounds the wait in the queue, not how long the host's steps take. The result
    is the last step's (the chain-link protocol of ``run_step``: a lane's next host gets it).
    """
    from app.execution.step import execute

    req = self.request
    queue = (req.delivery_info or {}).get("routing_key")
    if prev is not None and prev.get("handover"):
        return prev  # a retry took this lane over: its chain runs this host later
    if prev is not None and _stopped(prev, key):
        return prev
    first = HostStepKey.from_dict(key)
    for step in range(first.step, max(until, first.step + 1)):
        k = first if step == first.step else dataclasses.replace(first, step=step, deadline=None)
        prev = execute(k, prev=prev, task_id=req.id, worker=req.hostname, queue=queue)
        if prev.get("handover") or prev.get("status") == "WAITING":
            break  # WAITING: a Wait or approval step; the coordinator continues the host
        if _still_running_elsewhere(prev):
            break  # a second copy of this message: the first runs the host's later steps
    assert prev is not None
    return prev


def _stopped(prev: dict[str, Any], key: dict[str, Any]) -> bool:
    """This host stopped at a Wait or approval step in an earlier link of its chain: its later
    steps run when the coordinator continues it, not now. Or the earlier link was a second
    copy of a message whose first copy is still running that step on this host: the first
    copy's chain runs the later steps, in order, once it ends."""
    if prev.get("host") != key["h"]:
        return False
    return prev.get("status") == "WAITING" or _still_running_elsewhere(prev)


def _still_running_elsewhere(result: dict[str, Any]) -> bool:
    """A duplicate delivery's result (app.execution.ledger.summary) for a step another
    delivery has claimed and not finished."""
    return bool(result.get("duplicate")) and result.get("status") == "RUNNING"


@app.task(name="vmfarm.check_host", bind=True)
def check_host(self: Any, *, key: dict[str, Any]) -> dict[str, Any]:
    """Verification checks of one host (health endpoint, probe), from its region's worker."""
    from app.execution.checks import check

    return check(HostStepKey.from_dict(key), worker=self.request.hostname)
