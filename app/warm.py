"""A worker's warm start: what the first deployment after a worker starts would otherwise pay,
done when the worker starts.

A control worker (prefork) warms each pool process as it starts (:func:`warm_control`): the
coordinator's modules, which a gate imports lazily, and the ledger's pool of that process.

A ``vmfarm worker --region R`` (threads pool: SSH work happens in its one process) calls
:func:`warm_start` in a background thread once it is ready. It imports what a host step imports
lazily, opens the ledger's connection pool, and opens pooled SSH connections to the hosts of
its regions that deployments of the last ``VMFARM_WARM_HOURS`` hours used (newest first, at
most ``VMFARM_WARM_HOSTS``; 0 turns it off). Those connections go into the same pool the tasks
lease from (app.connectors.pool), so the first deployment's steps find them open, exactly as a
second deployment finds the first one's; unused ones close after the pool's idle limit.

Only what a deployment would do: the same host targets (user, port, key, known_hosts and host
key policy, secrets resolved on the worker), never a host of another region, never a
sandbox or local host (nothing to warm), nothing under the test connection. A host that does
not answer is logged and skipped; warming never stops or delays the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

log = logging.getLogger("vmfarm.worker")

# Connections opened at once: sshd's MaxStartups (10:30:100 by default) refuses some beyond 10.
PARALLEL = 8
# Recent executions read to find hosts: enough for many deployments, bounded for a busy ledger.
RECENT_EXECUTIONS = 200


@dataclass
class WarmReport:
    """What a warm start did."""

    hosts: int = 0  # hosts of this worker's regions found in recent deployments
    connected: int = 0
    failed: list[str] = field(default_factory=list)  # "user@host:port: error class"
    seconds: float = 0.0


def recent_hosts(regions: Iterable[str], *, limit: int, hours: float) -> list[Any]:
    """SSH hosts (app.providers.base.Host) of ``regions`` in stages of executions created in the
    last ``hours``, newest execution first, one per connection key, at most ``limit``."""
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import Execution, StageRun, utcnow
    from app.providers.base import Host

    wanted = set(regions)
    if limit <= 0 or not wanted:
        return []
    since = utcnow() - timedelta(hours=hours)
    with session_scope() as s:
        ids = s.exec(
            select(Execution.id)
            .where(col(Execution.created_at) >= since)
            .order_by(col(Execution.created_at).desc())
            .limit(RECENT_EXECUTIONS)
        ).all()
        order = {ex_id: i for i, ex_id in enumerate(ids)}
        rows = (
            s.exec(select(StageRun).where(col(StageRun.execution_id).in_(ids))).all() if ids else []
        )
        stages = sorted(rows, key=lambda r: (order[r.execution_id], r.stage_index))
    hosts: list[Host] = []
    seen: set[tuple[str, str, int]] = set()
    for stage in stages:
        for data in stage.hosts:
            try:
                host = Host.from_dict(data)
            except TypeError:  # a row of an older shape: nothing to warm from it
                continue
            key = (host.user, host.address, host.port)
            if host.region not in wanted or host.connection != "SSH" or key in seen:
                continue
            seen.add(key)
            hosts.append(host)
            if len(hosts) >= limit:
                return hosts
    return hosts


def warm_start(regions: Iterable[str]) -> WarmReport:
    """Imports, the ledger's pool and SSH connections to recent hosts of ``regions`` (see the
    module docstring). Never raises: a failure is logged and the worker goes on cold."""
    started = time.monotonic()
    report = WarmReport()
    regions = list(regions)
    try:
        # What a host step imports lazily (tasks.deploy -> app.execution.step and its units).
        import app.connectors.ssh
        import app.execution.checks
        import app.execution.step  # noqa: F401
        from app.connectors.pool import forced_connection
        from app.settings import get_settings

        settings = get_settings()
        if forced_connection() is not None:
            return report  # the test connection: no host is ever connected
        hosts = recent_hosts(regions, limit=settings.warm_hosts, hours=settings.warm_hours)
    except Exception as exc:
        log.warning("warm start: cannot read recent hosts, starting cold: %s", exc)
        return report
    report.hosts = len(hosts)
    if hosts:
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="vmfarm-warm") as pool:
            for host, error in zip(hosts, pool.map(_connect, hosts), strict=True):
                if error is None:
                    report.connected += 1
                else:
                    report.failed.append(f"{host.user}@{host.address}:{host.port}: {error}")
    report.seconds = time.monotonic() - started
    if report.hosts:
        log.info(
            "warm start: %d of %d recent hosts of %s connected in %.2fs%s",
            report.connected,
            report.hosts,
            ",".join(regions),
            report.seconds,
            f" ({len(report.failed)} did not answer: {'; '.join(report.failed[:5])})"
            if report.failed
            else "",
        )
    return report


def warm_control() -> None:
    """In a control worker's pool process: import what a gate imports and open the ledger's
    pool. Never raises."""
    try:
        from sqlalchemy import text

        import app.coordinator
        import app.execution.checks  # noqa: F401  (the traffic switch of a blue-green gate)
        from app.db import session_scope

        with session_scope() as s:
            s.connection().execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("warm start: the control worker starts cold: %s", exc)


def _connect(host: Any) -> str | None:
    """Open a pooled connection to ``host`` and give it back to the pool idle: None, or the
    error's class (its message may name a secret's file; the class is enough here)."""
    from app.connectors.pool import get_pool
    from app.execution.step import host_target

    try:
        with get_pool().lease(host_target(host, on_delegate=False)):
            return None
    except Exception as exc:
        return type(exc).__name__
