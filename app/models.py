"""The SQL ledger: the source of truth for every execution (Celery's backend is only plumbing).

Table models (``*Run``, ``Execution``, ``Instance``) are kept apart from the file schemas in
``app.definitions``. Times are naive UTC. Nothing here ever holds a secret value: rows hold
masked logs and references.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import NaiveDatetime
from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app import status as _status

# The rows' states (app.status holds them, so that naming them needs no SQL).
Status = _status.Status


def utcnow() -> datetime:
    """Naive UTC now: one convention for SQLite and PostgreSQL alike."""
    return datetime.now(UTC).replace(tzinfo=None)


class Execution(SQLModel, table=True):
    """One run of a pipeline."""

    id: str = Field(primary_key=True, max_length=32)
    pipeline: str = Field(index=True, max_length=128)
    pipeline_name: str = Field(default="", max_length=256)
    status: str = Field(default=Status.QUEUED, index=True, max_length=16)
    plan: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    inputs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str = Field(default="", max_length=128)
    current_stage: int = 0
    # While and after rolling back: {"cause": failure|aborted|requested|watch, "scope", "stages": [...],
    # "error": what started it}.
    rollback: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: NaiveDatetime = Field(default_factory=utcnow)
    started_at: NaiveDatetime | None = None
    finished_at: NaiveDatetime | None = None
    # Pipeline chaining: the execution (and its stage) that started this one as its child.
    parent_execution_id: str | None = Field(default=None, index=True, max_length=32)
    parent_stage: int | None = None


class StageRun(SQLModel, table=True):
    """One stage of an execution, with the hosts it targets."""

    __table_args__ = (UniqueConstraint("execution_id", "stage_index"),)

    id: int | None = Field(default=None, primary_key=True)
    execution_id: str = Field(foreign_key="execution.id", index=True, max_length=32)
    stage_index: int
    identifier: str = Field(max_length=128)
    name: str = Field(default="", max_length=256)
    status: str = Field(default=Status.PENDING, max_length=16)
    hosts: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    phases: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    # The stage's rollback plan once it rolls back: phases in reverse order, each with its hosts
    # and, per host, the version and the plan it returns to (see coordinator._plan_rollback).
    rollback: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = Field(default=None, sa_column=Column(Text))
    started_at: NaiveDatetime | None = None
    finished_at: NaiveDatetime | None = None
    # A Pipeline stage's outputs, read from its child when it succeeded (name -> value):
    # later stages read them as <+pipeline.stages.ID.output.NAME>.
    outputs: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class PhaseRun(SQLModel, table=True):
    """A phase dispatched once: the unique key makes a second dispatch fail loudly."""

    __table_args__ = (UniqueConstraint("execution_id", "stage_index", "phase", "kind"),)

    id: int | None = Field(default=None, primary_key=True)
    execution_id: str = Field(foreign_key="execution.id", index=True, max_length=32)
    stage_index: int
    phase: int
    kind: str = Field(default="deploy", max_length=16)
    status: str = Field(default=Status.RUNNING, max_length=16)
    hosts: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    verdict: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    dispatched_at: NaiveDatetime = Field(default_factory=utcnow)
    gate_at: NaiveDatetime | None = None


class StepRun(SQLModel, table=True):
    """A step of a stage, summed over its hosts (written by the gate, not per host)."""

    __table_args__ = (UniqueConstraint("execution_id", "stage_index", "step_index"),)

    id: int | None = Field(default=None, primary_key=True)
    execution_id: str = Field(foreign_key="execution.id", index=True, max_length=32)
    stage_index: int
    step_index: int
    identifier: str = Field(max_length=128)
    name: str = Field(default="", max_length=256)
    status: str = Field(default=Status.PENDING, max_length=16)
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    started_at: NaiveDatetime | None = None
    finished_at: NaiveDatetime | None = None


class HostStepRun(SQLModel, table=True):
    """One step on one host, one attempt. ``idem_key`` is claimed before anything runs."""

    __table_args__ = (
        Index("ix_hoststeprun_exec_stage_phase", "execution_id", "stage_index", "phase"),
    )

    id: int | None = Field(default=None, primary_key=True)
    idem_key: str = Field(unique=True, max_length=255)
    execution_id: str = Field(foreign_key="execution.id", max_length=32)
    stage_index: int
    phase: int
    step_index: int
    step_id: str = Field(max_length=128)
    kind: str = Field(default="deploy", max_length=16)  # deploy | rollback
    host: str = Field(max_length=255, index=True)
    region: str = Field(default="", max_length=64)
    attempt: int = 1
    status: str = Field(default=Status.RUNNING, max_length=16)
    error_class: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_column=Column(Text))
    failed_unit: str | None = Field(default=None, max_length=128)
    exit_code: int | None = None
    stdout_tail: str | None = Field(default=None, sa_column=Column(Text))
    stderr_tail: str | None = Field(default=None, sa_column=Column(Text))
    outputs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    worker: str | None = Field(default=None, max_length=255)
    queue: str | None = Field(default=None, max_length=128)
    task_id: str | None = Field(default=None, max_length=64)
    started_at: NaiveDatetime = Field(default_factory=utcnow)
    finished_at: NaiveDatetime | None = None
    heartbeat_at: NaiveDatetime = Field(default_factory=utcnow)


class LogChunk(SQLModel, table=True):
    """Output of a host step, in batches (never one row per line), secrets masked."""

    __table_args__ = (UniqueConstraint("host_step_run_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    host_step_run_id: int = Field(foreign_key="hoststeprun.id", index=True)
    seq: int
    unit: str = Field(default="", max_length=128)
    stream: str = Field(default="stdout", max_length=8)
    text: str = Field(sa_column=Column(Text, nullable=False))
    created_at: NaiveDatetime = Field(default_factory=utcnow)


class Instance(SQLModel, table=True):
    """Which version runs on which host, per service, environment and infrastructure."""

    __table_args__ = (UniqueConstraint("service", "environment", "infrastructure", "host"),)

    id: int | None = Field(default=None, primary_key=True)
    service: str = Field(max_length=128)
    environment: str = Field(max_length=128)
    infrastructure: str = Field(max_length=128)
    host: str = Field(max_length=255)
    region: str = Field(default="", max_length=64)
    version: str | None = Field(default=None, max_length=255)
    previous_version: str | None = Field(default=None, max_length=255)
    execution_id: str = Field(max_length=32)
    # The execution that deployed previous_version: a built-in rollback re-runs its steps.
    previous_execution_id: str | None = Field(default=None, max_length=32)
    # Releases the host holds under its deployment path (Release units), newest first.
    releases: list[str] | None = Field(default=None, sa_column=Column(JSON))
    updated_at: NaiveDatetime = Field(default_factory=utcnow)


class CheckRun(SQLModel, table=True):
    """One host's verification checks in a gate, with their numbers (health, probe)."""

    __table_args__ = (
        Index("ix_checkrun_exec_stage_phase", "execution_id", "stage_index", "phase"),
    )

    id: int | None = Field(default=None, primary_key=True)
    idem_key: str = Field(unique=True, max_length=255)
    execution_id: str = Field(foreign_key="execution.id", max_length=32)
    stage_index: int
    phase: int
    host: str = Field(max_length=255)
    region: str = Field(default="", max_length=64)
    status: str = Field(default=Status.RUNNING, max_length=16)
    passed: bool | None = None
    results: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    worker: str | None = Field(default=None, max_length=255)
    started_at: NaiveDatetime = Field(default_factory=utcnow)
    finished_at: NaiveDatetime | None = None


class WorkerBeat(SQLModel, table=True):
    """A running ``vmfarm worker`` (a delegate): what it consumes, renewed every
    ``heartbeat_interval``; live while ``beat_at`` is younger than ``heartbeat_timeout``.
    Deleted on a clean shutdown, so a row that stops beating is a worker that died."""

    name: str = Field(primary_key=True, max_length=255)  # Celery node name (-n)
    hostname: str = Field(default="", max_length=255)
    pid: int = 0
    regions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    queues: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    concurrency: int = 0
    pool: str = Field(default="", max_length=32)
    in_flight: int = 0
    started_at: NaiveDatetime = Field(default_factory=utcnow)
    beat_at: NaiveDatetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Who did what, when, and what came of it (``vmfarm audit``): a run, an approval, a
    refusal by RBAC or policy. No foreign key: a refusal may name an execution that does not
    exist, and the trail outlives executions. ``detail`` is masked: never a secret value."""

    id: int | None = Field(default=None, primary_key=True)
    at: NaiveDatetime = Field(default_factory=utcnow, index=True)
    user: str = Field(default="", max_length=128, index=True)
    action: str = Field(max_length=32)
    execution_id: str | None = Field(default=None, max_length=32, index=True)
    pipeline: str | None = Field(default=None, max_length=128)
    outcome: str = Field(max_length=32)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ApiToken(SQLModel, table=True):
    """A machine's credential for the server (``vmfarm tokens create``): only the SHA-256 of
    the token is kept (the token itself is shown once), with the roles it carries, who made
    it, when it expires, when it was last used and whether it was revoked (app.auth.tokens)."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128, index=True)
    token_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=16)  # the first characters, to recognise a token in a list
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_by: str = Field(default="", max_length=255)
    created_at: NaiveDatetime = Field(default_factory=utcnow)
    expires_at: NaiveDatetime | None = None
    last_used_at: NaiveDatetime | None = None
    revoked_at: NaiveDatetime | None = None
    revoked_by: str | None = Field(default=None, max_length=255)


class RegistryVersion(SQLModel, table=True):
    """One version of a registry entry (app.registry): an Environment, Infrastructure,
    Service, Connector, Template or Pipeline document as it was applied, who applied it and
    when. Versions are only added (append-only, like the audit trail); the latest is the
    entry. ``env_type`` is an Environment's type, ``env_ref`` an Infrastructure's
    environment: the facts RBAC decides on."""

    __table_args__ = (UniqueConstraint("kind", "ident", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32, index=True)
    ident: str = Field(max_length=255, index=True)
    version: int
    text: str = Field(sa_column=Column(Text, nullable=False))
    author: str = Field(default="", max_length=255)
    token_id: str | None = Field(default=None, max_length=32)
    env_type: str | None = Field(default=None, max_length=32)
    env_ref: str | None = Field(default=None, max_length=255)
    created_at: NaiveDatetime = Field(default_factory=utcnow)


class RegistryUse(SQLModel, table=True):
    """A registry version an execution was resolved with (its environments, infrastructures,
    connectors, and the services, templates and pipeline it did not bring in its files)."""

    __table_args__ = (UniqueConstraint("execution_id", "kind", "ident"),)

    id: int | None = Field(default=None, primary_key=True)
    execution_id: str = Field(foreign_key="execution.id", index=True, max_length=32)
    kind: str = Field(max_length=32)
    ident: str = Field(max_length=255)
    version: int


class WebhookDelivery(SQLModel, table=True):
    """A delivery to a webhook trigger (``POST /api/v1/webhooks/{trigger}``), one row per
    trigger and delivery id: a repeated delivery finds its row and starts nothing new.
    ``outcome`` is started (``execution_id`` set), skipped (its conditions did not hold;
    ``detail`` says which) or pending (being started). No payload is kept."""

    __table_args__ = (UniqueConstraint("trigger_id", "delivery_id"),)

    id: int | None = Field(default=None, primary_key=True)
    trigger_id: str = Field(max_length=128, index=True)
    delivery_id: str = Field(max_length=160)
    received_at: NaiveDatetime = Field(default_factory=utcnow)
    outcome: str = Field(max_length=16)
    execution_id: str | None = Field(default=None, max_length=32)
    detail: str = Field(default="", max_length=1000)


class ArtifactPoll(SQLModel, table=True):
    """An artifact trigger's last poll of its repository: when, and what went wrong (the
    error's message, no credential in it; "" when it went well). ``primed`` once the first
    poll recorded what the repository held: builds it finds later are new."""

    trigger_id: str = Field(max_length=128, primary_key=True)
    polled_at: NaiveDatetime = Field(default_factory=utcnow)
    ok_at: NaiveDatetime | None = None
    error: str = Field(default="", max_length=1000)
    primed: bool = False
    # The polled source (a hash of the trigger's artifact spec): another source primes again.
    source: str = Field(default="", max_length=64)


class ArtifactBuild(SQLModel, table=True):
    """A build an artifact trigger saw, one row per trigger and build (inserted or skipped:
    however many server processes poll, one of them starts it). ``outcome`` is seen (there
    at the first poll), started (``execution_id`` set), skipped (an eventCondition does not
    hold, or a newer build came in the same poll; ``detail`` says which), failed (refused;
    ``detail`` says why) or pending (being started)."""

    __table_args__ = (UniqueConstraint("trigger_id", "build"),)

    id: int | None = Field(default=None, primary_key=True)
    trigger_id: str = Field(max_length=128, index=True)
    build: str = Field(max_length=1024)
    seen_at: NaiveDatetime = Field(default_factory=utcnow)
    outcome: str = Field(max_length=16)
    execution_id: str | None = Field(default=None, max_length=32)
    detail: str = Field(default="", max_length=1000)
