"""The coordinator: turns pipeline files into an execution and drives it phase by phase.

Read it in this order (each module imports only the ones below it: an import-linter contract
in pyproject.toml holds it)::

    dryrun      ``vmfarm plan``: what submit would record, as plain data, nothing recorded
    submit      record an execution (a run, a retry of failed hosts, a rollback), then advance
    actions     what a person does to a running execution: approve, reject, intervene, abort
    gates       what finished work reports (a phase's gate, verification, a switch, discovery)
    reconcile   what error callbacks miss: lost workers, unclaimed work, lost gates, timeouts
    machine     ``advance()``: the state machine, the only place that decides what happens next
    approvals   Approval stages         discovery   cloud hosts listed by region workers
    watch       the watch after deployment (rollbackStrategy.triggers): checks, breach, pass
                                        (also for ``vmfarm hosts``: discover_on_workers)
    failure     failure strategies at the stage: ignore, fail, abort, intervene, roll back
    rollback    rollback plans from the ledger and the rollback phases
    verdicts    phase verdicts from the ledger: budget, verification checks
    instances   the Instance ledger: which version runs where
    retry       retries of failed attempts: recorded first, then published with a countdown
    routing     delegates: which region queue and worker tags take a task
    publish     the only publisher: every canvas goes out after its transaction commits
    ledger      the locked execution row, stage rows read once per process, the end of a run

The coordinator never imports worker code (``tasks/``, ``app.execution``); workers call it.
"""

from __future__ import annotations

from typing import Any

from app.coordinator.actions import abort, abort_orphans, decide_approval, intervene
from app.coordinator.discovery import discover_on_workers
from app.coordinator.dryrun import dry_run
from app.coordinator.gates import (
    discovery_done,
    gate,
    record_switch,
    verification_gate,
    watch_check,
)
from app.coordinator.instances import releases_held
from app.coordinator.ledger import new_execution_id, record_lost_step
from app.coordinator.machine import advance, send_notifications
from app.coordinator.precedence import stage_action
from app.coordinator.reconcile import reconcile as _reconcile
from app.coordinator.rollback import rollback_plan
from app.coordinator.routing import discovery_region, unserved_delegates
from app.coordinator.submit import prepare, record, retry_failed, rollback_execution, submit
from app.errors import ApprovalRefused


def reconcile(*, now: Any = None) -> list[str]:
    """The reconciler (app.coordinator.reconcile), then the chained executions whose parent
    ended without them (actions.abort_orphans)."""
    return _reconcile(now=now) + abort_orphans()


__all__ = [
    "ApprovalRefused",
    "abort",
    "advance",
    "decide_approval",
    "discover_on_workers",
    "discovery_done",
    "discovery_region",
    "dry_run",
    "gate",
    "intervene",
    "new_execution_id",
    "prepare",
    "reconcile",
    "record",
    "record_lost_step",
    "record_switch",
    "releases_held",
    "retry_failed",
    "rollback_execution",
    "rollback_plan",
    "send_notifications",
    "stage_action",
    "submit",
    "unserved_delegates",
    "verification_gate",
    "watch_check",
]
