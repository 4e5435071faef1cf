"""Messages the broker lost, sent again.

A Redis restarted without persistence (or flushed) forgets the messages still waiting in its
queues. A host whose message was lost would wait for the dispatch expiry
(``VMFARM_DISPATCH_EXPIRES``, an hour) and then fail as "no worker took its steps", although a
worker was consuming all along.

So the reconciler looks, at each run, for the hosts of running deploy phases that have not
started (no row in the ledger, or only the PENDING first attempt a resend records) although
their message should be in a queue, and has been for at least one reconcile interval: the host
is first in its ``maxConcurrency`` lane, or the host before it in its lane has finished (a later
host of a lane is published by the chain only then, so "no row" alone does not mean "lost").
Host tasks carry a task id derived from their idempotency key (``app.canvas.task_id_of``), so
"is its message still there?" is a lookup of that id in the headers of the messages in its
region's queues (``vmfarm.<region>`` and its tag queues; a signed body leaves the headers
readable) and in the transport's ``unacked`` hash (messages a worker has taken and not yet
acknowledged; with early ack they leave it as the task starts).

A message found nowhere was lost: the lane from that host on is published again through the one
publisher (``app.canvas.retry_canvas``, at once), under the same idempotency keys and the
phase's dispatch deadline. That is safe: a step runs only after its key is claimed in SQL, so a
copy that was not lost after all runs nothing twice. The broker is read before the ledger is
checked again, so a worker that took the message meanwhile has claimed it by then. The lane's
hosts are recorded PENDING first (as the retry engine does, app.coordinator.retry): the resent
lane's chord ends with the phase's gate, which must not judge the phase while another resent
lane still waits, and a PENDING row that no worker claims fails after the dispatch expiry
(``expire_pending``). The resend is recorded in the phase's verdict (``resent``: host -> each
time; ``vmfarm status -o json`` shows it as the phase's ``resent``, apart from the gate's
verdict) and in the reconciler's actions; the same host is not sent again within a reconcile
interval. A lost message is so sent again within two reconcile intervals of the broker's return.

Only with a Redis broker and the Redis result backend (``app.canvas.traced``). The embedded
SQLite broker keeps its messages in its database file, which a restart does not lose: there,
nothing is sent again, and a host no worker took still fails after the dispatch expiry.
Rollback phases, verification checks and the later tasks of a host (a step with other worker
tags) are not covered: they keep the dispatch expiry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from app import canvas
from app.canvas import HostStepKey
from app.coordinator.ledger import deferred, deployment_stage, lock_execution
from app.coordinator.publish import Dispatch, publish
from app.coordinator.retry import lane_followers
from app.coordinator.routing import tags_of
from app.db import session_scope
from app.models import Execution, HostStepRun, PhaseRun, StageRun, Status
from app.settings import get_settings

log = logging.getLogger("vmfarm.coordinator")


@dataclass(frozen=True)
class Waiting:
    """A host of a running deploy phase whose first message should be in a queue: it has not
    started, and its lane reached it (``since``) a while ago."""

    key: HostStepKey  # its first step, attempt 1
    since: datetime


def resend_lost(now: datetime) -> list[str]:
    """Send again the lanes whose next host's message the broker lost; the reconciler's action
    lines. A no-op unless the broker is Redis and host tasks carry their key's task id."""
    settings = get_settings()
    if not settings.celery_broker.startswith(("redis://", "rediss://")) or not canvas.traced():
        return []
    due = now - timedelta(seconds=settings.reconcile_interval)
    waiting = waiting_hosts(due)
    if not waiting:
        return []
    present = task_ids_in_broker({w.key.region for w in waiting})
    if present is None:
        return []  # the broker cannot be read now (restarting?): next time
    actions = []
    for w in waiting:
        if canvas.task_id_of(w.key) not in present:
            done = _resend(w.key, due, now)
            if done:
                actions.append(done)
    return actions


def waiting_hosts(due: datetime) -> list[Waiting]:
    """The hosts of running deploy phases that have not started and whose message should have
    been in a queue since before ``due`` (``lane_reached``). A host sent again after ``due``
    waits for the next run."""
    out: list[Waiting] = []
    with session_scope() as s:
        for pr in s.exec(
            select(PhaseRun).where(
                PhaseRun.status == Status.RUNNING,
                PhaseRun.kind == "deploy",
                PhaseRun.dispatched_at < due,
            )
        ).all():
            rows = [
                (r.host, r.step_index, r.status, r.finished_at, r.attempt)
                for r in s.exec(
                    select(HostStepRun)
                    .where(
                        HostStepRun.execution_id == pr.execution_id,
                        HostStepRun.stage_index == pr.stage_index,
                        HostStepRun.phase == pr.phase,
                        HostStepRun.kind == "deploy",
                    )
                    .options(
                        *deferred(
                            HostStepRun.stdout_tail,
                            HostStepRun.stderr_tail,
                            HostStepRun.outputs,
                            HostStepRun.error,
                        )
                    )
                ).all()
            ]
            started = {r[0] for r in rows if not _unstarted(r[1], r[4], r[2])}
            if all(h in started for h in pr.hosts):
                continue
            ex = s.get(Execution, pr.execution_id)
            if ex is None or ex.status != Status.RUNNING:
                continue
            stage = deployment_stage(ex, pr.stage_index)
            if not stage.steps:
                continue  # nothing to send
            run = s.exec(
                select(StageRun).where(
                    StageRun.execution_id == ex.id, StageRun.stage_index == pr.stage_index
                )
            ).one()
            regions = {h["name"]: h["region"] for h in run.hosts}
            resent = {
                h: datetime.fromisoformat(t[-1])
                for h, t in ((pr.verdict or {}).get("resent") or {}).items()
                if t
            }
            for host, since in lane_reached(
                list(pr.hosts),
                stage.strategy.max_concurrency,
                len(stage.steps),
                rows,
                pr.dispatched_at,
                resent,
            ):
                if since < due:
                    out.append(
                        Waiting(
                            HostStepKey(ex.id, pr.stage_index, pr.phase, host, 0, 1, regions[host]),
                            since,
                        )
                    )
    return out


def lane_reached(
    hosts: list[str],
    lanes: int | None,
    step_count: int,
    rows: list[Any],
    dispatched_at: datetime,
    resent: dict[str, datetime],
) -> list[tuple[str, datetime]]:
    """(host, since when its message should be in a queue) for the hosts of a phase that have
    not started; ``rows``: the phase's (host, step, status, finished_at, attempt).

    ``phase_canvas`` deals ``hosts`` round-robin into ``lanes`` (maxConcurrency) chains: the
    first host of a lane is sent with the phase (``dispatched_at``), a later one only when the
    host before it in its lane has finished its last step; a host whose lane has not reached it
    has no message anywhere and is left out. A resend (``resent``: host -> last time) starts
    the wait again."""
    started = {r[0] for r in rows if not _unstarted(r[1], r[4], r[2])}
    finished = _finished(rows, step_count)
    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    out: list[tuple[str, datetime]] = []
    for i, host in enumerate(hosts):
        if host in started:
            continue
        since = dispatched_at if i < n else finished.get(hosts[i - n])
        if since is None:
            continue  # its lane has not reached it: its message is not sent yet
        out.append((host, max(since, resent.get(host, since))))
    return out


def _unstarted(step: int, attempt: int, status: str) -> bool:
    """A row that says nothing has started: the first attempt of a host's first step,
    recorded PENDING before it was sent."""
    return step == 0 and attempt == 1 and status == Status.PENDING


def _finished(rows: Any, step_count: int) -> dict[str, datetime]:
    """When each host of ``rows`` (host, step, status, finished_at, attempt) finished its
    last step, for the hosts that did (and have no attempt running or waiting)."""
    busy = {r[0] for r in rows if r[2] not in Status.TERMINAL}
    out: dict[str, datetime] = {}
    for host, step, _, finished_at, _ in rows:
        if host in busy or step != step_count - 1 or finished_at is None:
            continue
        out[host] = max(out.get(host, finished_at), finished_at)
    return out


def task_ids_in_broker(regions: set[str]) -> set[str] | None:
    """The task ids of every message in the queues of ``regions`` (``vmfarm.<region>`` and
    its tag queues ``vmfarm.<region>[...]``, priority lists included) and in the broker's
    unacked hash; None when the broker cannot be read."""
    from app.celery import app
    from app.delegates import queues_holding_messages

    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            channel: Any = conn.default_channel
            client = channel.client
            ids: set[str] = set()
            for queue in queues_holding_messages(client):
                if queue.split("[", 1)[0].removeprefix("vmfarm.") not in regions:
                    continue
                for pri in channel.priority_steps:
                    for raw in client.lrange(channel._q_for_pri(queue, pri), 0, -1):
                        ids.add(_task_id(raw))
            for raw in client.hvals(channel.unacked_key):
                with_route = json.loads(raw)  # [message, exchange, routing key]
                ids.add(_task_id(with_route[0] if isinstance(with_route, list) else raw))
            return ids
    except Exception as exc:  # the broker is away: nothing is judged lost
        log.warning("cannot read the broker's queues: %s", exc)
        return None


def _task_id(raw: Any) -> str:
    """The task id in the headers of a kombu message (JSON; a signed body leaves them
    readable)."""
    message = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    return str((message.get("headers") or {}).get("id") or "")


def _resend(key: HostStepKey, due: datetime, now: datetime) -> str | None:
    """Publish the lane from ``key``'s host on again (the hosts behind it that have not
    started), recording it in the phase; None when the host claimed its step meanwhile or was
    sent again since ``due``."""
    settings = get_settings()
    with session_scope() as s:
        ex = lock_execution(s, key.execution)
        pr = s.exec(
            select(PhaseRun).where(
                PhaseRun.execution_id == key.execution,
                PhaseRun.stage_index == key.stage,
                PhaseRun.phase == key.phase,
                PhaseRun.kind == "deploy",
            )
        ).first()
        if ex is None or ex.status != Status.RUNNING or pr is None or pr.status != Status.RUNNING:
            return None
        resent = dict((pr.verdict or {}).get("resent") or {})
        if resent.get(key.host) and datetime.fromisoformat(resent[key.host][-1]) >= due:
            return None  # sent again by a concurrent reconciler
        stage = deployment_stage(ex, key.stage)
        rows = s.exec(
            select(
                HostStepRun.host, HostStepRun.step_index, HostStepRun.status, HostStepRun.attempt
            ).where(
                HostStepRun.execution_id == key.execution,
                HostStepRun.stage_index == key.stage,
                HostStepRun.phase == key.phase,
                HostStepRun.kind == "deploy",
            )
        ).all()
        started = {h for h, step, status, attempt in rows if not _unstarted(step, attempt, status)}
        recorded = {h for h, *_ in rows}
        if key.host in started:
            return None  # a worker took it after all (the broker was read before the ledger)
        run = s.exec(
            select(StageRun).where(
                StageRun.execution_id == key.execution, StageRun.stage_index == key.stage
            )
        ).one()
        by_name = {h["name"]: h for h in run.hosts}
        followers = [
            h
            for h in lane_followers(list(pr.hosts), stage.strategy.max_concurrency, key.host)
            if h not in started
        ]
        route = tags_of(stage, [by_name[h] for h in [key.host, *followers]], stage.steps)
        for h in [key.host, *followers]:
            if h in recorded:
                continue
            try:  # PENDING: in flight for the gates (see the module's doc)
                with s.begin_nested():
                    s.add(
                        HostStepRun(
                            idem_key=HostStepKey(
                                key.execution, key.stage, key.phase, h, 0, 1, by_name[h]["region"]
                            ).idem,
                            execution_id=key.execution,
                            stage_index=key.stage,
                            phase=key.phase,
                            step_index=0,
                            step_id=stage.steps[0].identifier,
                            kind="deploy",
                            host=h,
                            region=by_name[h]["region"],
                            attempt=1,
                            status=Status.PENDING,
                            started_at=now,
                            heartbeat_at=now,
                        )
                    )
            except IntegrityError:  # a worker claimed it this very moment: it has started
                if h == key.host:
                    return None
                followers.remove(h)
        lane = [(h, by_name[h]["region"], 0, 1) for h in [key.host, *followers]]
        resent[key.host] = [*resent.get(key.host, []), now.isoformat()]
        pr.verdict = {**(pr.verdict or {}), "resent": resent}
        s.add(pr)
        # The phase's own dispatch deadline: a resend does not lengthen the wait in the queue.
        deadline = round(
            pr.dispatched_at.replace(tzinfo=UTC).timestamp() + settings.dispatch_expires, 3
        )
        steps = len(stage.steps)
    publish(
        Dispatch(
            "resend",
            key.execution,
            key.stage,
            key.phase,
            [(h, r) for h, r, _, _ in lane],
            step_count=steps,
            tags_of=route,
            lane=lane,
            deadline=deadline,
        )
    )
    queue = f"vmfarm.{key.region}"
    log.warning(
        "execution %s: the message of %s (stage %d phase %d) was in no queue of the "
        "broker and the host has not started: sent again",
        key.execution,
        key.host,
        key.stage,
        key.phase,
    )
    then = f" (then {', '.join(followers)})" if followers else ""
    return (
        f"{key.execution}: {key.host}: its message was lost from {queue} (the broker "
        f"restarted?); re-sent under the same idempotency key{then}"
    )
