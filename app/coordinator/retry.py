"""Retries: a failed attempt that its failure strategy retries becomes a new attempt.
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import select

from app.canvas import HostStepKey
from app.coordinator.ledger import record_lost_step
from app.coordinator.precedence import failure_action
from app.coordinator.routing import queue_served, tags_of
from app.db import session_scope
from app.definitions.base import parse_duration
from app.models import (
    Execution,
    HostStepRun,
    PhaseRun,
    StageRun,
    Status,
)
from app.settings import get_settings

NOT_RETRIED = "not retried:"


def _lane_followers(hosts: list[str], lanes: int | None, host: str) -> list[str]:
    """Hosts after ``host`` in its lane (phase_canvas deals hosts round-robin into lanes)."""
    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    i = hosts.index(host)
    return hosts[i + n::n]


def retry_pending(stage: dict[str, Any], row: HostStepRun) -> bool:
    """A step whose worker was lost and whose failure strategy retries it: the reconciler
    has sent a new attempt, so the host is not done."""
    if row.status != Status.FAILED or row.error_class != "DelegateRestart" or \
            row.kind != "deploy" or NOT_RETRIED in (row.error or ""):
        return False
    action = failure_action(stage["steps"][row.step_index], stage, "DelegateRestart")
    return bool(action and action["type"] == "Retry"
                and row.attempt - 1 < int(action["spec"]["retryCount"]))


def after_worker_lost(key: HostStepKey) -> str:
    """Apply the failure strategy to a step whose worker was lost (DelegateRestart).

    Retry: a new attempt of that step and the host's later steps, then of the hosts that
    waited behind it in its lane, on the same region queue (another worker takes it).
    Otherwise the hosts behind it in its lane never run: they are recorded as failed."""
    from celery import chain, chord

    from app.canvas import advance_later, link

    with session_scope() as s:
        ex = s.get(Execution, key.execution)
        pr = s.exec(select(PhaseRun).where(
            PhaseRun.execution_id == key.execution, PhaseRun.stage_index == key.stage,
            PhaseRun.phase == key.phase, PhaseRun.kind == key.kind)).first()
        if ex is None or pr is None or key.kind != "deploy" or ex.status in Status.TERMINAL:
            return "nothing more to do"
        stage = ex.plan["stages"][key.stage]
        run = s.exec(select(StageRun).where(StageRun.execution_id == key.execution,
                                            StageRun.stage_index == key.stage)).one()
        regions = {h["name"]: h["region"] for h in run.hosts}
        started = {r.host for r in s.exec(select(HostStepRun).where(
            HostStepRun.execution_id == key.execution, HostStepRun.stage_index == key.stage,
            HostStepRun.phase == key.phase)).all()}
        followers = [h for h in _lane_followers(list(pr.hosts),
                                                stage["strategy"].get("maxConcurrency"),
                                                key.host) if h not in started]
        action = failure_action(stage["steps"][key.step], stage, "DelegateRestart")
        n_steps = len(stage["steps"])
        by_name = {h["name"]: h for h in run.hosts}
        route = tags_of(stage, [by_name[h] for h in [key.host, *followers]], stage["steps"])
    deadline = round(time.time() + get_settings().dispatch_expires, 3)
    retry = bool(action and action["type"] == "Retry"
                 and key.attempt - 1 < int(action["spec"]["retryCount"]))
    if retry and not queue_served(key.region, route.get((key.host, key.step), ())):
        with session_scope() as s:
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
            row.error = f"{row.error}; {NOT_RETRIED} no live worker consumes vmfarm.{key.region}"
            s.add(row)
        retry = False
    if retry and action is not None:
        intervals = action["spec"]["retryIntervals"]
        wait = parse_duration(intervals[min(key.attempt - 1, len(intervals) - 1)])
        links = [link("vmfarm.run_step", key=HostStepKey(
            key.execution, key.stage, key.phase, key.host, i, key.attempt + 1, key.region,
            deadline, tags=route.get((key.host, i), ())).to_dict())
                 for i in range(key.step, n_steps)]
        links += [link("vmfarm.run_step", key=HostStepKey(
            key.execution, key.stage, key.phase, h, i, 1, regions[h], deadline,
            tags=route.get((h, i), ())).to_dict())
                  for h in followers for i in range(n_steps)]
        links[0] = links[0].set(countdown=wait)
        chord([chain(*links)], advance_later(execution_id=key.execution)).apply_async()
        return (f"retrying as attempt {key.attempt + 1} on queue vmfarm.{key.region}"
                + (f" (then {', '.join(followers)})" if followers else ""))
    for h in followers:
        record_lost_step(HostStepKey(key.execution, key.stage, key.phase, h, 0, 1, regions[h]),
                         error_class="DelegateRestart",
                         error=f"never ran: the worker running its lane (host {key.host}) "
                               "was lost")
    return "failed (no Retry strategy for DelegateRestart)" + (
        f"; {', '.join(followers)} never ran" if followers else "")
