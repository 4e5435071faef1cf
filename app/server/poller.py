"""Artifact triggers' polls: a thread of ``vmfarm server`` asks every enabled artifact trigger's
repository for its builds every ``VMFARM_ARTIFACT_POLL_INTERVAL`` seconds (default 60; 0: no
polling).

* The first poll of a trigger (or of its source, when a new version of the trigger or of its
  connector polls another place) records what the repository holds and starts nothing: only
  builds that appear afterwards are new (as Harness does). A disabled trigger is not polled.
* A poll that finds new builds starts one execution, for the newest of those the
  eventConditions hold for, with ``<+trigger.artifact.build>`` set to it, the way a webhook
  delivery starts one (``start_run``: the trigger's input set, issue 12's value rules, the
  subject ``trigger:ID``'s permissions, an audit entry). The other new builds are recorded as
  skipped, with the reason; a build whose run is refused (permissions, an input's check) is
  recorded as failed with the reason, and is not tried again.
* One row per trigger and build (``ArtifactBuild``), inserted or skipped: however many server
  processes poll the same repository, one of them starts a build, once.
* A poll that fails (the repository is down, refuses the credentials, the connector is gone)
  records its message on ``ArtifactPoll`` (shown by ``vmfarm triggers``); nothing else happens,
  and the next poll tries again. No credential is in a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from app.errors import VmfarmError

log = logging.getLogger("vmfarm.server")


def _fingerprint(trig: Any, connector: Any) -> str:
    """What is polled: the artifact spec but its conditions, and the connector (its server)."""
    spec = trig.artifact.model_dump(mode="json", exclude={"spec": {"event_conditions"}})
    conn = connector.model_dump(mode="json") if connector is not None else None
    return hashlib.sha256(json.dumps([spec, conn], sort_keys=True).encode()).hexdigest()


def _connector(ref: str | None) -> Any:
    """The registry's latest version of the connector ``ref`` names (its ``spec``)."""
    if not ref:
        return None
    from app.db import session_scope
    from app.definitions.models.connector import ConnectorSpec, connector_id
    from app.registry import entry_of, latest

    ident = connector_id(ref)
    with session_scope() as s:
        row = latest(s, kind="Connector").get(("Connector", ident))
        if row is None:
            raise VmfarmError(f"connectorRef {ref!r} names no stored connector")
        data = entry_of(row).data
    return ConnectorSpec.model_validate(data).spec


def _insert_builds(trigger_id: str, rows: Iterable[dict[str, Any]]) -> int:
    """Insert the rows, skipping builds already recorded; how many were inserted."""
    from sqlalchemy.dialects import postgresql, sqlite

    from app.db import session_scope
    from app.models import ArtifactBuild, utcnow

    rows = [{"trigger_id": trigger_id, "seen_at": utcnow(), "detail": "", **r} for r in rows]
    if not rows:
        return 0
    inserted = 0
    with session_scope() as s:
        dialect = s.get_bind().dialect.name
        mod: Any = postgresql if dialect == "postgresql" else sqlite
        for start in range(0, len(rows), 500):
            stmt = (
                mod.insert(ArtifactBuild)
                .values(rows[start : start + 500])
                .on_conflict_do_nothing(index_elements=["trigger_id", "build"])
            )
            inserted += s.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
    return inserted


def _settle(trigger_id: str, build: str, outcome: str, **fields: Any) -> None:
    from sqlmodel import select

    from app.db import session_scope
    from app.models import ArtifactBuild

    with session_scope() as s:
        row = s.exec(
            select(ArtifactBuild).where(
                ArtifactBuild.trigger_id == trigger_id, ArtifactBuild.build == build
            )
        ).one()
        row.outcome = outcome
        for k, v in fields.items():
            setattr(row, k, v)
        s.add(row)


def _state(trigger_id: str) -> Any:
    from app.db import session_scope
    from app.models import ArtifactPoll

    with session_scope() as s:
        return s.get(ArtifactPoll, trigger_id)


def _record_poll(trigger_id: str, *, error: str = "", primed: str | None = None) -> None:
    """The poll's time and error; with ``primed`` (the source's fingerprint), that the builds
    of that source are recorded."""
    from sqlalchemy.exc import IntegrityError

    from app.db import session_scope
    from app.models import ArtifactPoll, utcnow

    for attempt in range(2):  # two processes may create the row at once
        try:
            with session_scope() as s:
                row = s.get(ArtifactPoll, trigger_id) or ArtifactPoll(trigger_id=trigger_id)
                row.polled_at = utcnow()
                row.error = error[:1000]
                if not error:
                    row.ok_at = row.polled_at
                if primed is not None:
                    row.primed, row.source = True, primed
                s.add(row)
            return
        except IntegrityError:
            if attempt:
                raise


def _known(trigger_id: str) -> set[str]:
    from sqlmodel import select

    from app.db import session_scope
    from app.models import ArtifactBuild

    with session_scope() as s:
        return set(
            s.exec(select(ArtifactBuild.build).where(ArtifactBuild.trigger_id == trigger_id))
        )


def _audit(trigger_id: str, outcome: str, **detail: Any) -> None:
    from app.audit import record_quietly

    record_quietly("artifact-trigger", user=f"trigger:{trigger_id}", outcome=outcome, detail=detail)


def _message(exc: BaseException) -> str:
    """What went wrong, for people: vmfarm's own message (which holds no credential), else the
    exception's type only."""
    if isinstance(exc, VmfarmError):
        return str(exc)
    from fastapi import HTTPException

    if isinstance(exc, HTTPException):
        return str(exc.detail)
    return f"the poll failed: {type(exc).__name__}"


def poll(trig: Any, rbac: Callable[[], Any]) -> str | None:
    """Poll one artifact trigger once; the execution it started, if any."""
    from app.triggers import repository

    what = f"trigger {trig.id}"
    try:
        connector = _connector(trig.artifact.spec.connector_ref)
        found = repository.builds(trig.artifact, connector, what)
    except Exception as exc:
        message = _message(exc)
        log.warning("artifact trigger %s: the poll failed: %s", trig.id, message)
        _record_poll(trig.id, error=message)
        return None
    source = _fingerprint(trig, connector)
    state = _state(trig.id)
    if state is None or not state.primed or state.source != source:
        _insert_builds(trig.id, ({"build": b.build[:1024], "outcome": "seen"} for b in found))
        _record_poll(trig.id, primed=source)
        log.info("artifact trigger %s: %d build(s) there at the first poll", trig.id, len(found))
        return None
    _record_poll(trig.id)
    known = _known(trig.id)
    new = [b for b in found if b.build not in known and len(b.build) <= 1024]
    if not new:
        return None
    conditions = trig.artifact.spec.event_conditions
    chosen = repository.newest([b for b in new if repository.matches(conditions, b.build)])
    skipped = [
        {
            "build": b.build,
            "outcome": "skipped",
            "detail": f"a newer build came in the same poll: {chosen.build}"[:1000]
            if chosen is not None and repository.matches(conditions, b.build)
            else "an eventCondition does not hold",
        }
        for b in new
        if b is not chosen
    ]
    _insert_builds(trig.id, skipped)
    if chosen is None or not _insert_builds(
        trig.id, [{"build": chosen.build, "outcome": "pending"}]
    ):
        return None  # nothing for the trigger, or another server process has it
    return _start(trig, chosen.build, rbac)


def _start(trig: Any, build: str, rbac: Callable[[], Any]) -> str | None:
    from app.operations import Actor
    from app.server.routes.executions import start_run
    from app.triggers import webhook

    try:
        inputs = webhook.inputs_of(trig.body.input_yaml, None, {}, source=trig.source, build=build)
        actor = Actor(name=f"trigger:{trig.id}", kind="trigger")
        execution = start_run(actor, {}, trig.pipeline, inputs, rbac())
    except Exception as exc:  # refused (RBAC, input rules) or failed: recorded, never raised
        reason = _message(exc)[:1000]
        log.warning("artifact trigger %s: build %s not started: %s", trig.id, build, reason)
        _settle(trig.id, build, "failed", detail=reason)
        _audit(trig.id, "refused", build=build, reason=reason[:500])
        return None
    _settle(trig.id, build, "started", execution_id=execution)
    _audit(trig.id, "started", build=build, execution=execution)
    log.info("artifact trigger %s: build %s started execution %s", trig.id, build, execution)
    return execution


def poll_all(rbac: Callable[[], Any]) -> None:
    """One poll of every enabled artifact trigger (a failure stays with its trigger)."""
    from app.registry import stored_triggers

    try:
        triggers = [t for _, t in stored_triggers() if t.kind == "artifact" and t.body.enabled]
    except Exception:
        log.exception("artifact triggers: cannot read the registry")
        return
    for trig in triggers:
        try:
            poll(trig, rbac)
        except Exception:
            log.exception("artifact trigger %s: the poll failed", trig.id)


class Poller:
    """The polling thread (a daemon: it ends with the server)."""

    def __init__(self, rbac: Callable[[], Any], interval: float) -> None:
        self.rbac = rbac
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="artifact-poller", daemon=True)

    def start(self) -> Poller:
        if self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            poll_all(self.rbac)
            self._stop.wait(self.interval)


def start(rbac: Callable[[], Any]) -> Poller:
    """Start polling (``VMFARM_ARTIFACT_POLL_INTERVAL``; 0: a poller that never polls)."""
    from app.settings import get_settings

    return Poller(rbac, get_settings().artifact_poll_interval).start()


__all__ = ["Poller", "poll", "poll_all", "start"]
