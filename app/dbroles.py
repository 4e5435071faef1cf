"""PostgreSQL roles of the ledger: who may read and write which table.

Three group roles (NOLOGIN); the people running vmfarm make login roles that are members::

    vmfarm_server    the server and the control worker: every table, but the audit trail is
                     append-only (INSERT and SELECT; no UPDATE, DELETE or TRUNCATE), and so are
                     the registry's versions (a version is never rewritten), and the
                     schema belongs to the migrating role, not to it
    vmfarm_worker    region workers: read plans, stage rows, versions, registry versions and
                     step rows; write
                     only their step rows (HostStepRun, CheckRun), log chunks (insert only)
                     and their own heartbeat (WorkerBeat); never executions, approvals,
                     audit, API tokens
    vmfarm_readonly  metrics and reports: read everything but the API tokens' hashes

For example, as the database owner (``psql``; passwords never on a command line)::

    CREATE ROLE vmfarm_r1 LOGIN IN ROLE vmfarm_worker;   \\password vmfarm_r1
    CREATE ROLE vmfarm_api LOGIN IN ROLE vmfarm_server;  \\password vmfarm_api

Migration 0008 creates the roles (when the migrating role may: superuser or CREATEROLE) and
grants; ``apply()`` is idempotent and grants again (after a migration added a table, run
``vmfarm server db-roles``). Tables a later migration creates are readable by the server and
by readonly through default privileges; the worker gets only what ``WORKER_WRITES`` and
``WORKER_READS`` list. The audit trail is append-only for every role, the owner included,
through a trigger; only the table's owner could drop it.

What a region worker writes, read from app/execution, tasks/deploy.py, tasks/discovery.py,
app/worker.py: the claim and the outcome of a host step (HostStepRun insert, update: status,
outputs, heartbeat), of a host's checks (CheckRun), log chunks, its WorkerBeat row. The Abort
failure strategy no longer aborts from the worker: it asks the control queue
(``vmfarm.abort_execution``), which the coordinator runs. A retry (app.coordinator.retry) is
recorded by the worker whose attempt failed: it reads the phase's record (its hosts and lanes)
and inserts the next attempt as a PENDING step row, nothing else.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text

log = logging.getLogger("vmfarm.db")

SERVER, WORKER, READONLY = "vmfarm_server", "vmfarm_worker", "vmfarm_readonly"
ROLES = (SERVER, WORKER, READONLY)
# Append-only for every role: rows are added and read, never changed or removed.
APPEND_ONLY = ("auditevent", "registryversion")
# Read by the server alone (API token hashes, webhook deliveries, artifact triggers' polls).
SERVER_ONLY = ("apitoken", "webhookdelivery", "artifactpoll", "artifactbuild")
# What a region worker reads: its plan (execution, stagerun), versions (instance), the step
# rows it claims and the earlier outputs of its host, the worker registry, the schema version.
WORKER_READS = (
    "alembic_version",
    "execution",
    "stagerun",
    "phaserun",
    "hoststeprun",
    "checkrun",
    "instance",
    "workerbeat",
    # The registry's versions and which of them each execution used (app.registry).
    "registryversion",
    "registryuse",
)
WORKER_WRITES: dict[str, tuple[str, ...]] = {
    "hoststeprun": ("INSERT", "UPDATE"),
    "checkrun": ("INSERT", "UPDATE"),
    "logchunk": ("INSERT",),
    "workerbeat": ("INSERT", "UPDATE", "DELETE"),
}
WORKER_SEQUENCES = ("hoststeprun_id_seq", "checkrun_id_seq", "logchunk_id_seq")

_TRIGGER_FN = """
CREATE OR REPLACE FUNCTION vmfarm_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'permission denied: % is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$
"""


def append_only(conn: Any, table: str) -> None:
    """A trigger refusing UPDATE, DELETE and TRUNCATE on ``table``, whoever asks."""
    conn.execute(text(_TRIGGER_FN))
    conn.execute(text(f'DROP TRIGGER IF EXISTS {table}_append_only ON "{table}"'))
    conn.execute(
        text(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON "
            f'"{table}" FOR EACH ROW EXECUTE FUNCTION vmfarm_append_only()'
        )
    )
    conn.execute(text(f'DROP TRIGGER IF EXISTS {table}_no_truncate ON "{table}"'))
    conn.execute(
        text(
            f'CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON "{table}" '
            "FOR EACH STATEMENT EXECUTE FUNCTION vmfarm_append_only()"
        )
    )


def _tables(conn: Any) -> list[str]:
    return list(
        conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        ).scalars()
    )


def _sequences(conn: Any) -> list[str]:
    return list(
        conn.execute(
            text("SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()")
        ).scalars()
    )


def ensure_roles(conn: Any) -> list[str]:
    """Create the missing group roles; returns those still missing (the migrating role may
    not create roles: then a database administrator runs ``vmfarm server db-roles``)."""
    have = set(
        conn.execute(
            text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(ROLES)}
        ).scalars()
    )
    missing = [r for r in ROLES if r not in have]
    if not missing:
        return []
    may = conn.execute(
        text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
    ).scalar()
    if not may:
        return missing
    for role in missing:
        # Two databases on one server may migrate at once: roles are server-wide.
        conn.execute(
            text(
                f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        )
    return []


def apply(conn: Any) -> bool:
    """Create the roles if needed and (re)grant every privilege they hold on this database's
    tables; PostgreSQL only (elsewhere nothing to do). False when the roles do not exist and
    cannot be created here (logged: the grants then wait for an administrator)."""
    if conn.dialect.name != "postgresql":
        return True
    present = set(_tables(conn))
    for table in APPEND_ONLY:
        if table in present:  # an earlier migration runs this before a later table exists
            append_only(conn, table)
    missing = ensure_roles(conn)
    if missing:
        log.warning(
            "the ledger's roles %s do not exist and %s may not create them: run "
            "`vmfarm server db-roles` as a database administrator",
            ", ".join(missing),
            conn.execute(text("SELECT current_user")).scalar(),
        )
        return False
    tables, sequences = _tables(conn), _sequences(conn)
    schema = conn.execute(text("SELECT current_schema()")).scalar()
    roles = ", ".join(ROLES)
    db = conn.execute(text("SELECT current_database()")).scalar()
    conn.execute(text(f'GRANT CONNECT ON DATABASE "{db}" TO {roles}'))
    conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO {roles}'))
    for t in tables:
        conn.execute(text(f'REVOKE ALL ON "{t}" FROM {roles}'))
        if t == "alembic_version":
            conn.execute(text(f'GRANT SELECT ON "{t}" TO {roles}'))
            continue
        server = "SELECT, INSERT" if t in APPEND_ONLY else "SELECT, INSERT, UPDATE, DELETE"
        conn.execute(text(f'GRANT {server} ON "{t}" TO {SERVER}'))
        if t not in SERVER_ONLY:
            conn.execute(text(f'GRANT SELECT ON "{t}" TO {READONLY}'))
        worker = [*(["SELECT"] if t in WORKER_READS else []), *WORKER_WRITES.get(t, ())]
        if worker:
            conn.execute(text(f'GRANT {", ".join(worker)} ON "{t}" TO {WORKER}'))
    for seq in sequences:
        conn.execute(text(f'REVOKE ALL ON SEQUENCE "{seq}" FROM {roles}'))
        conn.execute(text(f'GRANT USAGE, SELECT ON SEQUENCE "{seq}" TO {SERVER}'))
        if seq in WORKER_SEQUENCES:
            conn.execute(text(f'GRANT USAGE, SELECT ON SEQUENCE "{seq}" TO {WORKER}'))
    # Tables and sequences later migrations create (as this role): the server and readonly
    # can use them at once; the worker only after its grants are listed here.
    conn.execute(
        text(
            f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT, INSERT, '
            f"UPDATE, DELETE ON TABLES TO {SERVER}"
        )
    )
    conn.execute(
        text(f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT SELECT ON TABLES TO {READONLY}')
    )
    conn.execute(
        text(
            f'ALTER DEFAULT PRIVILEGES IN SCHEMA "{schema}" GRANT USAGE, SELECT ON '
            f"SEQUENCES TO {SERVER}"
        )
    )
    return True


__all__ = [
    "APPEND_ONLY",
    "READONLY",
    "ROLES",
    "SERVER",
    "WORKER",
    "WORKER_READS",
    "WORKER_WRITES",
    "append_only",
    "apply",
    "ensure_roles",
]
