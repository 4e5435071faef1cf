"""Metrics of the fleet: workers per region from the registry, and every queue work can wait in.

A queue is reported when any of these knows it, so that a region whose queue fills while no
worker consumes it shows up with its depth and 0 consumers:

* the control queue, always;
* the queues of every registered worker, live or stale;
* ``VMFARM_METRICS_REGIONS`` (the regions you deploy to: their queues are always reported);
* the regions of the hosts of unfinished and recent executions (their stages' hosts);
* the broker: every queue bound to the vmfarm exchange and every ``vmfarm.*`` list in Redis
  (a queue with messages is a Redis list named after it, whoever published them).

Consumers are the live registered workers that consume the queue.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import bindparam, text
from sqlmodel import Session

from app.models import Status

log = logging.getLogger("vmfarm.metrics")

STATES = ("live", "stale")


@dataclass
class Fleet:
    """The registry, summed: region workers per (region, state), control workers per state,
    live slots and tasks in flight per region, live consumers per queue."""

    workers: Counter[tuple[str, str]] = field(default_factory=Counter)
    control: Counter[str] = field(default_factory=Counter)
    slots: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    consumers: Counter[str] = field(default_factory=Counter)
    queues: set[str] = field(default_factory=set)


def fleet_of(workers: Iterable[dict[str, Any]]) -> Fleet:
    """Sum registry entries (``app.delegates.all_workers()``)."""
    from app.celery import CONTROL_QUEUE

    out = Fleet()
    for w in workers:
        state = "live" if w.get("live") else "stale"
        queues = list(w.get("queues") or [])
        out.queues.update(queues)
        for region in w.get("regions") or []:
            out.workers[(region, state)] += 1
            if state == "live":
                out.slots[region] += int(w.get("concurrency") or 0)
                out.in_flight[region] += int(w.get("in_flight") or 0)
        if CONTROL_QUEUE in queues:
            out.control[state] += 1
        if state == "live":
            for q in queues:
                out.consumers[q] += 1
    return out


def fleet_families(fleet: Fleet) -> list[Metric]:
    workers = GaugeMetricFamily(
        "vmfarm_workers",
        "Registered region workers (delegates) by region and state: live "
        "(heartbeat within VMFARM_HEARTBEAT_TIMEOUT) or stale (registered, not heard from)",
        labels=["region", "state"],
    )
    for region in sorted({r for r, _ in fleet.workers}):
        for state in STATES:
            workers.add_metric([region, state], fleet.workers.get((region, state), 0))
    control = GaugeMetricFamily(
        "vmfarm_control_workers",
        "Registered workers consuming the control queue, by state (live, stale)",
        labels=["state"],
    )
    for state in STATES:
        control.add_metric([state], fleet.control.get(state, 0))
    slots = GaugeMetricFamily(
        "vmfarm_worker_slots",
        "Concurrency of the live workers of each "
        "region (a worker of several regions counts in each)",
        labels=["region"],
    )
    busy = GaugeMetricFamily(
        "vmfarm_worker_tasks_in_flight",
        "Tasks running on the live workers of each region",
        labels=["region"],
    )
    for region in sorted({r for r, _ in fleet.workers}):
        slots.add_metric([region], fleet.slots.get(region, 0))
        busy.add_metric([region], fleet.in_flight.get(region, 0))
    return [workers, control, slots, busy]


def regions_of_executions(s: Session, *, since: datetime, limit: int) -> set[str]:
    """Regions of the hosts of unfinished executions and of the ``limit`` newest executions
    created after ``since`` (from their stages' host lists, read in SQL)."""
    dialect = s.get_bind().dialect.name
    terminal = sorted(Status.TERMINAL)
    ids = (
        "(SELECT id FROM execution WHERE status NOT IN :terminal UNION SELECT id FROM "
        "(SELECT id FROM execution WHERE created_at >= :since ORDER BY created_at DESC "
        "LIMIT :limit) AS recent)"
    )
    if dialect == "postgresql":
        sql = (
            "SELECT DISTINCT h.value->>'region' FROM stagerun, json_array_elements("
            f"stagerun.hosts) AS h(value) WHERE stagerun.execution_id IN {ids}"
        )
    elif dialect == "sqlite":
        sql = (
            "SELECT DISTINCT json_extract(h.value, '$.region') FROM stagerun, json_each("
            f"stagerun.hosts) AS h WHERE stagerun.execution_id IN {ids}"
        )
    else:
        return set()
    query = text(sql).bindparams(bindparam("terminal", expanding=True))
    rows = (
        s.connection().execute(query, {"terminal": terminal, "since": since, "limit": limit}).all()
    )
    return {str(r[0]) for r in rows if r[0]}


def queue_names(fleet: Fleet, regions: Iterable[str]) -> set[str]:
    """The queues known without the broker: control, the workers', the regions'."""
    from app.celery import CONTROL_QUEUE, region_queue

    names = {CONTROL_QUEUE, *fleet.queues}
    for region in regions:
        try:
            names.add(region_queue(region))
        except ValueError:
            log.warning("metrics: %r is not a region name; its queue is not reported", region)
    return names


def queue_families(
    names: Iterable[str], depths: dict[str, int | None], consumers: Counter[str]
) -> list[Metric]:
    depth = GaugeMetricFamily(
        "vmfarm_queue_depth",
        "Messages waiting in each vmfarm queue (Redis broker only)",
        labels=["queue"],
    )
    served = GaugeMetricFamily(
        "vmfarm_queue_consumers",
        "Live registered workers consuming each vmfarm queue",
        labels=["queue"],
    )
    every = sorted(set(names) | set(depths))
    for q in every:
        n = depths.get(q)
        if n is not None:
            depth.add_metric([q], n)
        served.add_metric([q], consumers.get(q, 0))
    return [depth, served]
